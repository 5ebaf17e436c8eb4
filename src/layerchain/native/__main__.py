from layerchain.native import main

main()
