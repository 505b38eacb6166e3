from lmdistill.cli import main

raise SystemExit(main())
