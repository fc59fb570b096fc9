from qwen35.cli.main import main

main()
