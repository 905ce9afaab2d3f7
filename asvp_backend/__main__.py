from asvp_backend.cli import main

raise SystemExit(main())
