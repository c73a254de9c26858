#!/usr/bin/env escript
%%! -noshell
%%
%% erlmail-export.escript: dump an ErlMail 0.0.6 Mnesia database to a portable JSON file
%% that `erlmail import FILE` loads.
%%
%% Usage:
%%   escript erlmail-export.escript [OPTIONS] MNESIA_DIR [OUT.json]
%%
%%   MNESIA_DIR   the directory ErlMail's Mnesia used (its `-mnesia dir` / the `dir` of
%%                the `mnesia` application; it holds schema.DAT and *.DCD/*.DCL files).
%%   OUT.json     where to write the export; standard output when absent or "-". It
%%                holds the users' plaintext passwords, so it is written with mode 0600
%%                (a new file, made 0600 before any byte is written, renamed over
%%                OUT.json); delete it once imported.
%%
%% Options (ErlMail let a site rename its tables with the mnesia_table_* keys of its
%% application environment; give the same names here if you did):
%%   --domain-table NAME    default erlmail_domain
%%   --user-table NAME      default erlmail_user
%%   --message-table NAME   default erlmail_message
%%   --mailbox-table NAME   default erlmail_mailbox_store
%%
%% Stop ErlMail first: the directory is copied as it is on disk.
%%
%% How it reads the tables: Mnesia only loads disc_copies that its schema assigns to the
%% running node, and ErlMail ran as a named node (erlmail@host). Starting a node under
%% that name needs epmd, the same host name, and the old node to be down. Instead the
%% script copies MNESIA_DIR to a temporary directory, replaces the old node name by this
%% node's name (nonode@nohost) in the copy's schema.DAT and in its transaction and table
%% logs (LATEST.LOG, *.DCL, *.DCD), starts Mnesia on the copy, and reads the tables with
%% the ordinary Mnesia API. The original directory is never written to. Tested with
%% Erlang/OTP 25 (Mnesia 4.21).
%%
%% Records (ErlMail 0.0.6, include/erlmail.hrl; mnesia_store:create/2 made each table a
%% disc_copies `set` with record_name = the record and attributes = its fields):
%%   domain        {name, options}                      table erlmail_domain
%%   user          {name = {User, Domain}, password, options}       erlmail_user
%%   message       {name = {MsgName, User, Domain}, options, folder, uid, flags,
%%                  message}                             table erlmail_message
%%   mailbox_store {name = {MailBox, User, Domain}, subscribed, uidnext, uidvalidity,
%%                  options, messages}                  table erlmail_mailbox_store
%% Fields are read by the attribute names the table declares, not by position.
%%
%% Output (JSON, UTF-8):
%%   {"format": "erlmail-export", "version": 1, "source_node": "...",
%%    "domains":   [{"name", "options"}],
%%    "users":     [{"name", "domain", "password", "password_hash", "options"}],
%%    "mailboxes": [{"name", "user", "domain", "subscribed", "uidnext", "uidvalidity",
%%                   "messages": [names], "options"}],
%%    "messages":  [{"name", "user", "domain", "mailbox", "uid", "flags": [..],
%%                   "options", "body_base64"}]}
%% Names and passwords are text: Erlang strings of bytes are kept when they are valid
%% UTF-8 and read as Latin-1 otherwise. "password_hash" is null for ErlMail's plain-text
%% passwords, or the hash type ErlMail's user options named. "options" fields are the
%% Erlang term as text (`~p`), for reference only. Message bodies are base64 of the exact
%% bytes ErlMail stored. A message's "mailbox" is its `folder` when set, else the
%% mailbox_store whose message list names it, else "INBOX".

-mode(compile).

main(Args) ->
    %% Mnesia's start/stop notices are noise; errors still show.
    ok = logger:set_primary_config(level, warning),
    try run(parse_args(Args, #{})) of
        ok -> halt(0)
    catch
        throw:{usage, Msg} ->
            io:format(standard_error, "erlmail-export: ~ts~n~ts", [Msg, usage()]),
            halt(2);
        throw:{fail, Msg} ->
            io:format(standard_error, "erlmail-export: ~ts~n", [Msg]),
            halt(1)
    end.

usage() ->
    "usage: erlmail-export.escript [--domain-table T] [--user-table T] "
    "[--message-table T] [--mailbox-table T] MNESIA_DIR [OUT.json]\n".

parse_args(["--domain-table", T | Rest], Acc) -> parse_args(Rest, Acc#{domain => list_to_atom(T)});
parse_args(["--user-table", T | Rest], Acc) -> parse_args(Rest, Acc#{user => list_to_atom(T)});
parse_args(["--message-table", T | Rest], Acc) -> parse_args(Rest, Acc#{message => list_to_atom(T)});
parse_args(["--mailbox-table", T | Rest], Acc) -> parse_args(Rest, Acc#{mailbox => list_to_atom(T)});
parse_args(["-h" | _], _) -> throw({usage, "help"});
parse_args(["--help" | _], _) -> throw({usage, "help"});
parse_args(["--" ++ _ = Opt | _], _) -> throw({usage, "unknown option " ++ Opt});
parse_args([Dir], Acc) -> Acc#{dir => Dir, out => "-"};
parse_args([Dir, Out], Acc) -> Acc#{dir => Dir, out => Out};
parse_args(_, _) -> throw({usage, "expected MNESIA_DIR [OUT.json]"}).

run(Opts) ->
    Dir = maps:get(dir, Opts),
    Tabs = #{domain => maps:get(domain, Opts, erlmail_domain),
             user => maps:get(user, Opts, erlmail_user),
             message => maps:get(message, Opts, erlmail_message),
             mailbox => maps:get(mailbox, Opts, erlmail_mailbox_store)},
    filelib:is_regular(filename:join(Dir, "schema.DAT")) orelse
        throw({fail, "no Mnesia schema.DAT in " ++ Dir}),
    Copy = temp_dir(),
    try
        OldNode = copy_and_rename(Dir, Copy),
        Data = read_tables(Copy, Tabs),
        Json = encode(OldNode, Data),
        write_out(maps:get(out, Opts), Json),
        #{domains := D, users := U, mailboxes := MB, messages := M} = Data,
        io:format(standard_error,
                  "erlmail-export: ~b domains, ~b users, ~b mailboxes, ~b messages~n",
                  [length(D), length(U), length(MB), length(M)]),
        ok
    after
        _ = mnesia:stop(),
        _ = file:del_dir_r(Copy)
    end.

temp_dir() ->
    Base = case os:getenv("TMPDIR") of
               false -> "/tmp";
               "" -> "/tmp";
               T -> T
           end,
    Name = io_lib:format("erlmail-export-~s-~b",
                         [os:getpid(), erlang:unique_integer([positive])]),
    Dir = filename:join(Base, lists:flatten(Name)),
    ok = file:make_dir(Dir),
    Dir.

%% --- copying the directory and taking over its node name -------------------------------

copy_and_rename(Dir, Copy) ->
    {ok, Files} = file:list_dir(Dir),
    lists:foreach(
      fun(F) ->
              Src = filename:join(Dir, F),
              case filelib:is_regular(Src) of
                  true ->
                      {ok, _} = file:copy(Src, filename:join(Copy, F));
                  false ->
                      ok
              end
      end, Files),
    Schema = filename:join(Copy, "schema.DAT"),
    {ok, T} = dets:open_file(erlmail_export_schema,
                             [{file, Schema}, {keypos, 2}, {repair, false}]),
    Objs = dets:match_object(T, '_'),
    Old = case [N || {schema, schema, Cs} <- Objs,
                     N <- proplists:get_value(disc_copies, Cs, [])] of
              [N | _] -> N;
              [] -> throw({fail, "schema.DAT names no disc_copies node"})
          end,
    New = node(),
    case Old =:= New of
        true ->
            ok = dets:close(T);
        false ->
            Sub = fun(X) -> subst(X, Old, New) end,
            ok = dets:insert(T, [Sub(O) || O <- Objs]),
            ok = dets:close(T),
            %% Mnesia replays LATEST.LOG over the schema (it holds e.g. create_table ops
            %% not yet dumped), so the node name must be replaced there too.
            Logs = [F || F <- Files,
                         lists:member(filename:extension(F), [".LOG", ".DCL", ".DCD"])],
            lists:foreach(fun(F) -> rewrite_log(filename:join(Copy, F), Sub) end, Logs)
    end,
    Old.

subst(X, Old, New) when X =:= Old -> New;
subst(X, Old, New) when is_list(X) -> subst_list(X, Old, New);
subst(X, Old, New) when is_tuple(X) -> list_to_tuple(subst_list(tuple_to_list(X), Old, New));
subst(X, _, _) -> X.

%% Lists may be improper (Erlang strings never are, but be safe).
subst_list([], _, _) -> [];
subst_list([H | T], Old, New) -> [subst(H, Old, New) | subst_list(T, Old, New)];
subst_list(Tail, Old, New) -> subst(Tail, Old, New).

rewrite_log(Path, Sub) ->
    {ok, L} = disk_log:open([{name, erlmail_export_log}, {file, Path}, {mode, read_only},
                             {repair, true}]),
    Terms = read_log(L, start, []),
    ok = disk_log:close(L),
    ok = file:delete(Path),
    {ok, L2} = disk_log:open([{name, erlmail_export_log}, {file, Path}]),
    ok = disk_log:log_terms(L2, [Sub(Term) || Term <- Terms]),
    ok = disk_log:close(L2).

read_log(L, Cont, Acc) ->
    case disk_log:chunk(L, Cont) of
        eof -> lists:append(lists:reverse(Acc));
        {error, Reason} -> throw({fail, io_lib:format("reading ~p: ~p", [L, Reason])});
        {Cont2, Terms} -> read_log(L, Cont2, [Terms | Acc]);
        {Cont2, Terms, _BadBytes} -> read_log(L, Cont2, [Terms | Acc])
    end.

%% --- reading the tables ----------------------------------------------------------------

read_tables(Copy, Tabs) ->
    ok = application:set_env(mnesia, dir, Copy),
    ok = application:set_env(mnesia, debug, none),
    case mnesia:start() of
        ok -> ok;
        {error, R} -> throw({fail, io_lib:format("mnesia did not start: ~p", [R])})
    end,
    Names = maps:values(Tabs),
    Existing = mnesia:system_info(tables),
    Present = [N || N <- Names, lists:member(N, Existing)],
    %% Let the tables that exist finish loading before any complaint stops Mnesia.
    case mnesia:wait_for_tables(Present, 30000) of
        ok -> ok;
        {timeout, Missing} ->
            %% A table that also lived on another node of an ErlMail cluster waits for
            %% that node; our copy is all we have, so load it as it is.
            [yes = mnesia:force_load_table(N) || N <- Missing],
            ok = mnesia:wait_for_tables(Present, 30000);
        {error, R2} ->
            throw({fail, io_lib:format("tables did not load: ~p", [R2])})
    end,
    [throw({fail, io_lib:format("no table ~p in this Mnesia directory", [N])})
     || N <- Names, not lists:member(N, Existing)],
    Domains = [domain(R) || R <- rows(maps:get(domain, Tabs))],
    Users = [user(R) || R <- rows(maps:get(user, Tabs))],
    Mailboxes = [mailbox(R) || R <- rows(maps:get(mailbox, Tabs))],
    MsgRows = rows(maps:get(message, Tabs)),
    Index = maps:from_list(
              [{{Msg, U, D}, MB} || #{name := MB, user := U, domain := D, msgnames := Ms}
                                        <- Mailboxes, Msg <- Ms]),
    Messages = [message(R, Index) || R <- MsgRows],
    #{domains => lists:sort(Domains), users => lists:sort(Users),
      mailboxes => lists:sort(Mailboxes),
      %% Per mailbox in uid order, so that an import delivers oldest first.
      messages => lists:sort(fun(A, B) -> msg_key(A) =< msg_key(B) end, Messages)}.

msg_key(#{domain := D, user := U, mailbox := MB, uid := Uid, name := N}) -> {D, U, MB, Uid, N}.

%% Every record of a table as a map field => value, by the attributes the table declares.
rows(Tab) ->
    Attrs = mnesia:table_info(Tab, attributes),
    Recs = mnesia:dirty_match_object(Tab, mnesia:table_info(Tab, wild_pattern)),
    [maps:from_list(lists:zip(Attrs, tl(tuple_to_list(R)))) || R <- Recs].

field(Row, Name, Default) -> maps:get(Name, Row, Default).

domain(Row) ->
    #{name => text(field(Row, name, [])), options => term_text(field(Row, options, []))}.

user(Row) ->
    {U, D} = case field(Row, name, []) of
                 {U0, D0} -> {U0, D0};
                 Other -> throw({fail, io_lib:format("user key ~p is not {User,Domain}", [Other])})
             end,
    Opts = field(Row, options, []),
    #{name => text(U), domain => text(D), password => text(field(Row, password, [])),
      password_hash => hash_type(Opts), options => term_text(Opts)}.

%% ErlMail: "User Password - check options for HASH type, otherwise plain text". It never
%% fixed the key; accept the plausible spellings. Plain-text markers count as no hash.
hash_type(Opts) when is_list(Opts) ->
    Found = [V || {K, V} <- [O || O <- Opts, is_tuple(O), tuple_size(O) =:= 2],
                  lists:member(K, [hash, 'HASH', hash_type, password_hash, password_type])],
    case Found of
        [] -> null;
        [V | _] ->
            case string:lowercase(text(V)) of
                P when P =:= <<"plain">>; P =:= <<"plaintext">>; P =:= <<"plain_text">>;
                       P =:= <<"none">>; P =:= <<"false">> -> null;
                T -> T
            end
    end;
hash_type(_) -> null.

mailbox(Row) ->
    {MB, U, D} = field(Row, name, {[], [], []}),
    Ms = case field(Row, messages, []) of
             L when is_list(L) -> L;
             _ -> []
         end,
    #{name => text(MB), user => text(U), domain => text(D),
      subscribed => field(Row, subscribed, false) =:= true,
      uidnext => int(field(Row, uidnext, 0)), uidvalidity => int(field(Row, uidvalidity, 0)),
      msgnames => [{text(M), text(U), text(D)} || M <- Ms],
      messages => [text(M) || M <- Ms],
      options => term_text(field(Row, options, []))}.

message(Row, Index) ->
    {Name, U, D} = field(Row, name, {[], [], []}),
    Key = {text(Name), text(U), text(D)},
    Folder = text(field(Row, folder, [])),
    Mailbox = case Folder of
                  <<>> -> maps:get(Key, Index, <<"INBOX">>);
                  _ -> Folder
              end,
    Flags = case field(Row, flags, []) of
                L when is_list(L) -> [text(F) || F <- L];
                _ -> []
            end,
    #{name => text(Name), user => text(U), domain => text(D), mailbox => Mailbox,
      uid => int(field(Row, uid, 0)), flags => Flags,
      options => term_text(field(Row, options, [])),
      body => base64:encode(bytes(field(Row, message, <<>>)))}.

int(N) when is_integer(N) -> N;
int(_) -> 0.

%% --- converting Erlang data ------------------------------------------------------------

%% The exact bytes of a message body: a binary, an iolist of bytes, or (a string built
%% with code points above 255) its UTF-8 encoding.
bytes(B) when is_binary(B) -> B;
bytes(L) when is_list(L) ->
    try iolist_to_binary(L)
    catch error:badarg ->
            case unicode:characters_to_binary(L) of
                B when is_binary(B) -> B;
                _ -> throw({fail, "message body is neither bytes nor characters"})
            end
    end;
bytes(A) when is_atom(A) -> atom_to_binary(A, utf8);
bytes(Other) -> term_text(Other).

%% Text as UTF-8: bytes kept when they are UTF-8 already, else read as Latin-1.
text(B) when is_binary(B) ->
    case unicode:characters_to_binary(B) of
        B -> B;
        _ -> unicode:characters_to_binary(B, latin1)
    end;
text(L) when is_list(L) -> text(bytes(L));
text(A) when is_atom(A) -> atom_to_binary(A, utf8);
text(N) when is_integer(N) -> integer_to_binary(N);
text(Other) -> term_text(Other).

term_text(T) -> unicode:characters_to_binary(io_lib:format("~0tp", [T])).

%% --- JSON ----------------------------------------------------------------------------

encode(OldNode, #{domains := D, users := U, mailboxes := MB, messages := M}) ->
    [<<"{\"format\":\"erlmail-export\",\"version\":1,\"source_node\":">>,
     str(atom_to_binary(OldNode, utf8)),
     <<",\n\"domains\":">>, arr([obj([{name, str(N)}, {options, str(O)}])
                               || #{name := N, options := O} <- D]),
     <<",\n\"users\":">>,
     arr([obj([{name, str(N)}, {domain, str(Dm)}, {password, str(P)},
               {password_hash, case H of null -> <<"null">>; _ -> str(H) end},
               {options, str(O)}])
          || #{name := N, domain := Dm, password := P, password_hash := H, options := O} <- U]),
     <<",\n\"mailboxes\":">>,
     arr([obj([{name, str(N)}, {user, str(Us)}, {domain, str(Dm)},
               {subscribed, atom_to_binary(S, utf8)}, {uidnext, integer_to_binary(Nx)},
               {uidvalidity, integer_to_binary(V)}, {messages, arr([str(X) || X <- Ms])},
               {options, str(O)}])
          || #{name := N, user := Us, domain := Dm, subscribed := S, uidnext := Nx,
               uidvalidity := V, messages := Ms, options := O} <- MB]),
     <<",\n\"messages\":">>,
     arr([obj([{name, str(N)}, {user, str(Us)}, {domain, str(Dm)}, {mailbox, str(Box)},
               {uid, integer_to_binary(Uid)}, {flags, arr([str(F) || F <- Fl])},
               {options, str(O)}, {body_base64, [$", B, $"]}])
          || #{name := N, user := Us, domain := Dm, mailbox := Box, uid := Uid,
               flags := Fl, options := O, body := B} <- M]),
     <<"}\n">>].

arr(Items) -> [$[, lists:join(<<",\n">>, Items), $]].

obj(Pairs) -> [${, lists:join($,, [[str(atom_to_binary(K, utf8)), $:, V] || {K, V} <- Pairs]), $}].

%% A JSON string from UTF-8 text: quote, backslash and control characters escaped; all
%% other bytes (UTF-8 included) pass through.
str(B) -> [$", esc(B, []), $"].

esc(<<>>, Acc) -> lists:reverse(Acc);
esc(<<$", R/binary>>, Acc) -> esc(R, [<<"\\\"">> | Acc]);
esc(<<$\\, R/binary>>, Acc) -> esc(R, [<<"\\\\">> | Acc]);
esc(<<$\n, R/binary>>, Acc) -> esc(R, [<<"\\n">> | Acc]);
esc(<<$\r, R/binary>>, Acc) -> esc(R, [<<"\\r">> | Acc]);
esc(<<$\t, R/binary>>, Acc) -> esc(R, [<<"\\t">> | Acc]);
esc(<<C, R/binary>>, Acc) when C < 16#20; C =:= 16#7f ->
    esc(R, [io_lib:format("\\u~4.16.0b", [C]) | Acc]);
esc(<<C, R/binary>>, Acc) -> esc(R, [C | Acc]).

write_out("-", Json) ->
    %% The io protocol reads a binary as UTF-8 characters; a unicode device writes them
    %% back as the same UTF-8 bytes (a latin1 one would narrow them).
    ok = io:setopts(standard_io, [binary, {encoding, unicode}]),
    ok = io:put_chars(standard_io, iolist_to_binary(Json)),
    io:format(standard_error,
              "erlmail-export: standard output holds plaintext passwords: keep it where "
              "only you can read it~n", []);
write_out(Path, Json) ->
    %% The file holds ErlMail's plaintext passwords: it must never be readable by others,
    %% not even for a moment. A new file next to Path is created empty (exclusive: never
    %% one that exists, nor one a reader may hold open), made 0600, and only then written;
    %% it replaces Path by a rename.
    Tmp = lists:flatten(io_lib:format("~ts.tmp-~s", [Path, os:getpid()])),
    Fail = fun(What, R) ->
                   _ = file:delete(Tmp),
                   throw({fail, io_lib:format("cannot ~s ~ts: ~p", [What, Path, R])})
           end,
    Fd = case file:open(Tmp, [write, exclusive, raw, binary]) of
             {ok, F} -> F;
             {error, R0} -> Fail("create", R0)
         end,
    Steps = [{"chmod 0600", fun() -> file:change_mode(Tmp, 8#600) end},
             {"write", fun() -> file:write(Fd, Json) end},
             {"sync", fun() -> file:sync(Fd) end},
             {"close", fun() -> file:close(Fd) end},
             {"rename into", fun() -> file:rename(Tmp, Path) end}],
    lists:foreach(fun({What, Step}) ->
                          case Step() of
                              ok -> ok;
                              {error, R} -> _ = file:close(Fd), Fail(What, R)
                          end
                  end, Steps),
    io:format(standard_error,
              "erlmail-export: ~ts holds plaintext passwords: written with mode 0600 "
              "(owner only); delete it once imported~n", [Path]).
