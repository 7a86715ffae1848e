from bidsharmony.benchmark.run import main

raise SystemExit(main())
