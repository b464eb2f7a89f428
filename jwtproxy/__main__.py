from jwtproxy.cli import main

raise SystemExit(main())
