import sys

if sys.argv[1:2] == ["chat"]:  # the terminal client; copy-store below; anything else serves
    from .chat_main import main as chat_main

    raise SystemExit(chat_main(sys.argv[2:]))
if sys.argv[1:2] == ["copy-store"]:  # a SQLite store into PostgreSQL (docs/deploy.md)
    from .store.copy import main as copy_main

    raise SystemExit(copy_main(sys.argv[2:]))

try:
    from .server import main

    code = main()
except KeyboardInterrupt:
    # Ctrl+C before trio runs (the imports, the settings, hypercorn's config): as one inside
    # it but outside the graceful shutdown's window, one line and 130, not a traceback.
    print("service: interrupted (SIGINT) outside the graceful shutdown", file=sys.stderr)
    code = 130
raise SystemExit(code)
