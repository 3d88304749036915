from stream_infer.cli import main

main()
