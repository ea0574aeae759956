import sys

if sys.argv[1:2] == ["chat"]:  # the terminal client; anything else serves
    from .chat_main import main as chat_main

    raise SystemExit(chat_main(sys.argv[2:]))

from .server import main

raise SystemExit(main())
