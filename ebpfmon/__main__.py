from ebpfmon.cli import main

main()
