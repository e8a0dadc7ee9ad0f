from psm_train.cli import main

main()
