//! Reads ErlMail's own Erlang term files (the `.app` and sys.config shapes).
