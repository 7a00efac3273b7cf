from vtprune.cli import main

raise SystemExit(main())
