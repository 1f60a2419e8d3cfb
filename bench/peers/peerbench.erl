%% Erlang distribution measurements for bench/peers.sh.
%%
%% Two roles live in this module:
%%
%% * worker: every measured node runs `-s peerbench worker`. It registers
%%   `echo` (replies to {From, Ref}), `sink` (counts N binaries, then acks),
%%   `drain` (discards everything) and `watcher` (records the OS wall-clock
%%   time of every nodeup/nodedown it sees, so that times taken on different
%%   nodes of this machine can be compared).
%% * driver: a hidden node (`-s peerbench driver Config`) that starts the
%%   workers as OS processes, runs the measurements through rpc and prints
%%   Markdown table rows `| measurement | p50 | p99 | max | samples |` on
%%   standard output. Progress goes to standard error.
%%
%% The driver appends the OS pid of every node it starts to `pids` in the
%% run directory, so that the calling script can clean up after a crash.
%% Every wait is bounded; a worker halts itself after 30 minutes whatever
%% happens.
-module(peerbench).

-export([worker/0, connect_probe/1, join_probe/1, driver/1]).
-export([event_time/2, rtt/2, throughput/4, rtt_under_load/5, visible/0]).

-define(HOST, "127.0.0.1").
-define(WORKER_LIFETIME_MS, 30 * 60 * 1000).
-define(RPC_TIMEOUT_MS, 300000).

%%% ---------------------------------------------------------------- worker

%% Entry point of every measured node.
worker() ->
    _ = spawn(fun() -> timer:sleep(?WORKER_LIFETIME_MS), erlang:halt(3) end),
    Self = self(),
    register_spawn(watcher, fun() -> watcher_init(Self) end),
    receive watcher_ready -> ok after 10000 -> erlang:halt(4) end,
    register_spawn(echo, fun echo/0),
    register_spawn(sink, fun sink/0),
    register_spawn(drain, fun drain/0),
    ok.

register_spawn(Name, Fun) ->
    Pid = spawn(Fun),
    true = register(Name, Pid).

watcher_init(Parent) ->
    ok = net_kernel:monitor_nodes(true),
    events = ets:new(events, [named_table, public, set]),
    Parent ! watcher_ready,
    watcher().

watcher() ->
    receive
        {Kind, Node} when Kind =:= nodeup; Kind =:= nodedown ->
            %% Keep the first time a node was seen up or down.
            ets:insert_new(events, {{Kind, Node}, os:system_time(microsecond)}),
            watcher()
    end.

%% OS wall-clock time (microseconds) at which this node first saw Node go
%% up or down, or `undefined`.
event_time(Kind, Node) ->
    case ets:lookup(events, {Kind, Node}) of
        [{_, T}] -> T;
        [] -> undefined
    end.

echo() ->
    receive
        {From, Ref} -> From ! {Ref, pong}
    end,
    echo().

sink() ->
    receive
        {expect, N, From} ->
            sink_count(N),
            From ! sink_done;
        _ ->
            ok
    end,
    sink().

sink_count(0) -> ok;
sink_count(N) -> receive B when is_binary(B) -> sink_count(N - 1) end.

drain() ->
    receive _ -> drain() end.

visible() -> length(nodes()).

%% Run at boot of a fresh node (`-s peerbench connect_probe Target File`):
%% time the first connect_node/1 and write the microseconds to File.
connect_probe([Target, File]) ->
    T0 = erlang:monotonic_time(),
    Ok = net_kernel:connect_node(Target),
    Us = elapsed_us(T0),
    write_term(File, {Ok, Us}).

%% Run at boot of a joining node (`-s peerbench join_probe Target File`):
%% write the wall-clock time just before connecting to Target.
join_probe([Target, File]) ->
    T0 = os:system_time(microsecond),
    Ok = net_kernel:connect_node(Target),
    write_term(File, {Ok, T0}).

write_term(File, Term) ->
    Tmp = atom_to_list(File) ++ ".tmp",
    ok = file:write_file(Tmp, io_lib:format("~p.~n", [Term])),
    ok = file:rename(Tmp, atom_to_list(File)).

%%% ---------------------------------------------- measurements run on a worker

%% Count round trips to {echo, Peer}, after 100 warm-up ones; microseconds.
rtt(Peer, Count) ->
    _ = [rtt_once(Peer) || _ <- lists:seq(1, 100)],
    [rtt_once(Peer) || _ <- lists:seq(1, Count)].

rtt_once(Peer) ->
    Ref = make_ref(),
    T0 = erlang:monotonic_time(),
    {echo, Peer} ! {self(), Ref},
    receive
        {Ref, pong} -> elapsed_us(T0)
    after 60000 -> error({no_echo_reply, Peer})
    end.

%% Runs of "send N binaries of Size bytes to {sink, Peer}, wait for its
%% ack"; returns {messages per second, bytes per second} per run.
throughput(Peer, Size, N, Runs) ->
    Bin = payload(Size),
    _ = tput_run(Peer, Bin, max(1, N div 10)),
    [tput_run(Peer, Bin, N) || _ <- lists:seq(1, Runs)].

tput_run(Peer, Bin, N) ->
    Dest = {sink, Peer},
    Dest ! {expect, N, self()},
    T0 = erlang:monotonic_time(),
    send_n(Dest, Bin, N),
    receive
        sink_done -> ok
    after 300000 -> error({sink_timeout, Peer})
    end,
    Us = max(1, elapsed_us(T0)),
    {N * 1000000 / Us, N * byte_size(Bin) * 1000000 / Us}.

send_n(_, _, 0) -> ok;
send_n(Dest, Bin, N) -> Dest ! Bin, send_n(Dest, Bin, N - 1).

%% Round trips to {echo, Peer} while another process on this node sends
%% Size-byte binaries to {drain, Peer} as fast as the connection takes them:
%% Count samples, or fewer if BudgetMs runs out first. A sender to a busy
%% connection is suspended until it is not busy, so each round trip runs in
%% its own process and one that takes longer than CapMs is ended and counted
%% as CapMs. Returns {microseconds, how many hit the cap}.
rtt_under_load(Peer, Size, Count, BudgetMs, CapMs) ->
    Bin = payload(Size),
    Blaster = spawn(fun() -> blast({drain, Peer}, Bin) end),
    timer:sleep(500),
    Deadline = erlang:monotonic_time(millisecond) + BudgetMs,
    Samples = rtt_until(Peer, Count, Deadline, CapMs, []),
    exit(Blaster, kill),
    %% Let the queued load drain before anything else is measured.
    timer:sleep(1000),
    _ = rtt_once(Peer),
    {[Us || {Us, _} <- Samples], length([C || {_, C = capped} <- Samples])}.

rtt_until(_, 0, _, _, Acc) -> Acc;
rtt_until(Peer, Count, Deadline, CapMs, Acc) ->
    case erlang:monotonic_time(millisecond) > Deadline of
        true -> Acc;
        false -> rtt_until(Peer, Count - 1, Deadline, CapMs, [rtt_capped(Peer, CapMs) | Acc])
    end.

rtt_capped(Peer, CapMs) ->
    Self = self(),
    Tag = make_ref(),
    Pid = spawn(fun() -> Self ! {Tag, rtt_once(Peer)} end),
    receive
        {Tag, Us} -> {Us, ok}
    after CapMs ->
        exit(Pid, kill),
        {CapMs * 1000, capped}
    end.

blast(Dest, Bin) -> Dest ! Bin, blast(Dest, Bin).

payload(Size) -> <<<<(I rem 251)>> || I <- lists:seq(1, Size)>>.

elapsed_us(T0) ->
    erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond).

%%% ---------------------------------------------------------------- driver

%% Config is a file of Erlang terms written by bench/peers.sh:
%% {dir, Dir}. {erl, Path}. {erl_call, Path | none}. {cookie, String}.
%% {dist_args, [String]}. {ticktime, default | Seconds}. {phase, main | stop}.
%% {quick, Bool}. {label, String}. {reject_args, [String] | none}: distribution
%% arguments without a client certificate, which must be refused.
driver([ConfigFile]) ->
    Result =
        try
            {ok, Terms} = file:consult(atom_to_list(ConfigFile)),
            Cfg = maps:from_list(Terms),
            put(cfg, Cfg),
            put(seq, 0),
            run_phase(maps:get(phase, Cfg)),
            0
        catch
            Class:Reason:Stack ->
                log("driver failed: ~p:~p~n~p", [Class, Reason, Stack]),
                1
        end,
    stop_all_workers(),
    erlang:halt(Result).

cfg(Key) -> maps:get(Key, get(cfg)).

samples(Quick, Full) ->
    case cfg(quick) of
        true -> Quick;
        false -> Full
    end.

run_phase(main) ->
    pair_phase(),
    mesh_phase();
run_phase(stop) ->
    stop_phase().

%% Two nodes a and b: round trip, throughput, liveness under load, connect
%% time of fresh nodes, erl_call, fresh-node rpc.
pair_phase() ->
    [A, B] = start_nodes(["a", "b"], []),
    true = rpc(A, net_kernel, connect_node, [B]),
    RttN = samples(200, 2000),
    log("round trip, ~b samples", [RttN]),
    row("message round trip, idle pair, ms", us_to_ms(rpc(A, rtt, [B, RttN]))),

    Runs = samples(2, 10),
    SmallN = samples(20000, 200000),
    log("throughput 100 B, ~b runs of ~b", [Runs, SmallN]),
    Small = rpc(A, throughput, [B, 100, SmallN, Runs]),
    row(io_lib:format("one-way throughput, 100 B messages (~b per run), msgs/s", [SmallN]),
        [M || {M, _} <- Small]),
    BigN = samples(300, 3000),
    log("throughput 64 KiB, ~b runs of ~b", [Runs, BigN]),
    Big = rpc(A, throughput, [B, 65536, BigN, Runs]),
    row(io_lib:format("one-way throughput, 64 KiB messages (~b per run), MB/s", [BigN]),
        [Bps / 1.0e6 || {_, Bps} <- Big]),

    Budget = samples(20000, 120000),
    Cap = 10000,
    log("round trip under 64 KiB load, ~b samples or ~b s", [RttN, Budget div 1000]),
    {Loaded, Capped} = rpc(A, rtt_under_load, [B, 65536, RttN, Budget, Cap]),
    row(io_lib:format("message round trip while the same pair carries 64 KiB bulk "
                      "(~b samples or ~b s, whichever first; ~b of them unanswered after "
                      "~b s and counted as ~b s), ms",
                      [RttN, Budget div 1000, Capped, Cap div 1000, Cap div 1000]),
        us_to_ms(Loaded)),

    ConnN = samples(3, 20),
    log("connect time, ~b fresh nodes", [ConnN]),
    row("first connect_node/1 from a fresh node (epmd lookup + handshake), ms",
        us_to_ms([connect_sample(B, I) || I <- lists:seq(1, ConnN)])),

    CallN = samples(10, 50),
    case cfg(erl_call) of
        none ->
            row_text("erl_call -a 'erlang nodes', whole command, ms",
                     "n/a: erl_call speaks only TCP distribution");
        ErlCall ->
            log("erl_call, ~b samples", [CallN]),
            Args = ["-name", node_name(A), "-c", cfg(cookie), "-timeout", "30", "-a", "erlang nodes"],
            row("erl_call -a 'erlang nodes', whole command, ms",
                us_to_ms([command_us(ErlCall, Args, node_name(B)) || _ <- lists:seq(1, CallN)]))
    end,
    case cfg(reject_args) of
        none -> ok;
        RejectArgs -> refused_check(A, RejectArgs)
    end,
    RpcN = samples(3, 10),
    log("fresh erl node rpc, ~b samples", [RpcN]),
    row("fresh `erl` node: rpc:call(Node, erlang, nodes, []) and halt, whole command, ms",
        us_to_ms([fresh_rpc_us(A, B, I) || I <- lists:seq(1, RpcN)])),
    stop_nodes([A, B]).

connect_sample(Target, I) ->
    Name = "c" ++ integer_to_list(I),
    File = result_file(Name),
    Node = spawn_node(Name, ["-s", "peerbench", "connect_probe", atom_to_list(Target), File]),
    {true, Us} = wait_file(File),
    kill_node(Node, "-9"),
    Us.

%% A node whose distribution options hold no client certificate must not
%% get in: a check that the peer really is verified, not a measurement.
refused_check(Node, RejectArgs) ->
    Eval = io_lib:format("io:format(\"~~p~~n\", [net_adm:ping('~s')]), halt().", [Node]),
    Args = ["-noshell", "-noinput", "-hidden", "-name", "nocert@" ++ ?HOST,
            "-setcookie", cfg(cookie), "-start_epmd", "false",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}"] ++ RejectArgs
        ++ ["-eval", lists:flatten(Eval)],
    case command([cfg(erl) | Args]) of
        {0, _, Output} ->
            string:find(Output, "pang") =/= nomatch
                orelse error({node_without_certificate_got_in, Output}),
            row_text("check: a node without a client certificate is refused", "yes (ping: pang)");
        Other ->
            error({refused_check_failed, Other})
    end.

%% `erl` started fresh, asks Node for nodes() and halts: the equivalent of
%% erl_call over any distribution protocol.
fresh_rpc_us(Node, Expect, I) ->
    Eval = io_lib:format("io:format(\"~~p~~n\", [rpc:call('~s', erlang, nodes, [])]), halt().",
                         [Node]),
    Args = ["-noshell", "-noinput", "-hidden", "-name", "q" ++ integer_to_list(I) ++ "@" ++ ?HOST]
        ++ common_args() ++ ["-eval", lists:flatten(Eval)],
    command_us(cfg(erl), Args, node_name(Expect)).

%% Six nodes in a full mesh: idle memory and CPU, then rounds of "a seventh
%% node joins through one of them, then is killed with SIGKILL"; then one
%% SIGSTOP round at the default tick time (full run only).
mesh_phase() ->
    Mesh = start_mesh(6),
    log("idle 5 s, then CPU over 10 s", []),
    timer:sleep(5000),
    Pids = [os_pid(N) || N <- Mesh],
    T1 = [cpu_ticks(P) || P <- Pids],
    timer:sleep(10000),
    T2 = [cpu_ticks(P) || P <- Pids],
    Hz = list_to_integer(string:trim(os:cmd("getconf CLK_TCK"))),
    row("idle node resident memory (VmRSS, 6-node mesh), MiB",
        [vm_rss_kib(P) / 1024 || P <- Pids]),
    row("idle node CPU over 10 s (6-node mesh), % of one core",
        [(B - A) / Hz / 10 * 100 || {A, B} <- lists:zip(T1, T2)]),

    Rounds = samples(3, 10),
    log("~b join + kill -9 rounds", [Rounds]),
    Results = [join_kill_round(Mesh, I, "-9") || I <- lists:seq(1, Rounds)],
    Broken = length([B || {_, _, _, B = broken} <- Results]),
    row_text("rounds in which global disconnected healthy mesh nodes after the kill "
             "(prevent_overlapping_partitions, default since OTP 25; the mesh is reconnected "
             "before the next round)", io_lib:format("~b of ~b", [Broken, Rounds])),
    row("join: 7th node connects to one of a 6-node mesh, until all 6 list it in nodes(), ms",
        us_to_ms([J || {J, _, _, _} <- Results])),
    row("failure detection after kill -9 (TCP close), from the start of /bin/kill "
        "until all 6 others get nodedown, ms",
        us_to_ms([D || {_, D, _, _} <- Results])),
    row("running /bin/kill from the Erlang driver, start to exit (part of the row above), ms",
        us_to_ms([K || {_, _, K, _} <- Results])),
    case cfg(quick) of
        true ->
            row_text("failure detection after SIGSTOP, default net_ticktime 60 s, s",
                     "skipped in --quick");
        false ->
            log("SIGSTOP at the default net_ticktime: about a minute", []),
            {_, Stop, _, _} = join_kill_round(Mesh, Rounds + 1, "-STOP"),
            row("failure detection after SIGSTOP, default net_ticktime 60 s, until all 6 others get nodedown, s",
                [Stop / 1.0e6])
    end,
    stop_nodes(Mesh).

%% SIGSTOP rounds with the tick time of this driver's config (the script
%% runs this phase with a labelled, non-default net_ticktime).
stop_phase() ->
    Mesh = start_mesh(3),
    %% Let global settle on the new mesh before the first join.
    timer:sleep(5000),
    Rounds = samples(1, 5),
    log("~b SIGSTOP rounds at net_ticktime ~p", [Rounds, cfg(ticktime)]),
    Stops = [D || {_, D, _, _} <- [join_kill_round(Mesh, I, "-STOP") || I <- lists:seq(1, Rounds)]],
    row(io_lib:format("failure detection after SIGSTOP, net_ticktime ~p s (not the default), "
                      "until all ~b others get nodedown, s", [cfg(ticktime), length(Mesh)]),
        [D / 1.0e6 || D <- Stops]),
    stop_nodes(Mesh).

start_mesh(Count) ->
    Names = ["m" ++ integer_to_list(I) || I <- lists:seq(1, Count)],
    Mesh = [First | Rest] = start_nodes(Names, []),
    _ = [true = rpc(N, net_kernel, connect_node, [First]) || N <- Rest],
    _ = ensure_mesh(Mesh),
    Mesh.

%% Make sure every mesh node sees all the others; `intact` if they already
%% did, `broken` if connections had to be made again.
ensure_mesh(Mesh) ->
    Full = fun() -> lists:all(fun(N) -> rpc(N, visible, []) =:= length(Mesh) - 1 end, Mesh) end,
    case Full() of
        true -> intact;
        false ->
            _ = [rpc(N, net_kernel, connect_node, [M]) || N <- Mesh, M <- Mesh, N < M],
            wait_until(Full, 60000, mesh_not_formed),
            %% Let global finish its own reconnection attempts.
            timer:sleep(2000),
            wait_until(Full, 60000, mesh_not_formed),
            broken
    end.

%% A new node joins through the first mesh node, then gets `kill Signal`.
%% Returns {join time, detection time, /bin/kill time} in microseconds and
%% whether the mesh was still whole after the node went down.
join_kill_round(Mesh = [First | _], I, Signal) ->
    Name = "j" ++ integer_to_list(I),
    File = result_file(Name),
    Joiner = spawn_node(Name, ["-s", "peerbench", "join_probe", atom_to_list(First), File]),
    {true, T0} = wait_file(File),
    Ups = wait_events(Mesh, nodeup, Joiner, 180000),
    Join = lists:max(Ups) - T0,
    log("~s joined; seen up by each mesh node after ~w ms", [Name, [(U - T0) div 1000 || U <- Ups]]),
    timer:sleep(1000),
    K0 = os:system_time(microsecond),
    kill_node(Joiner, Signal),
    Kill = os:system_time(microsecond) - K0,
    Downs = wait_events(Mesh, nodedown, Joiner, 180000),
    Detect = lists:max(Downs) - K0,
    kill_node(Joiner, "-9"),
    timer:sleep(1000),
    Mesh1 = ensure_mesh(Mesh),
    Mesh1 =:= broken andalso log("global disconnected mesh nodes after ~s went down", [Name]),
    {Join, Detect, Kill, Mesh1}.

wait_events(Nodes, Kind, Subject, TimeoutMs) ->
    Get = fun() -> [rpc(N, event_time, [Kind, Subject]) || N <- Nodes] end,
    wait_until(fun() -> not lists:member(undefined, Get()) end, TimeoutMs,
               {missing_event, Kind, Subject}),
    Get().

%%% ------------------------------------------------------- node management

start_nodes(Names, Extra) ->
    Nodes = [spawn_node(N, Extra) || N <- Names],
    _ = [wait_until(fun() -> net_adm:ping(N) =:= pong end, 60000, {node_not_up, N})
         || N <- Nodes],
    _ = [wait_until(fun() -> rpc:call(N, erlang, whereis, [drain]) =/= undefined end,
                    30000, {worker_not_ready, N})
         || N <- Nodes],
    Nodes.

common_args() ->
    Tick = case cfg(ticktime) of
               default -> [];
               T -> ["-kernel", "net_ticktime", integer_to_list(T)]
           end,
    ["-setcookie", cfg(cookie), "-pa", cfg(dir), "-start_epmd", "false",
     "-kernel", "inet_dist_use_interface", "{127,0,0,1}"] ++ cfg(dist_args) ++ Tick.

%% Start `erl` as a worker with its output in Dir/Name.log; record its pid.
spawn_node(Name, Extra) ->
    Seq = get(seq) + 1,
    put(seq, Seq),
    Full = Name ++ "_" ++ integer_to_list(Seq),
    Node = list_to_atom(Full ++ "@" ++ ?HOST),
    Log = filename:join(cfg(dir), Full ++ ".log"),
    Args = ["-c", "exec \"$0\" \"$@\" >>'" ++ Log ++ "' 2>&1", cfg(erl),
            "-noshell", "-noinput", "-name", atom_to_list(Node)]
        ++ common_args() ++ ["-s", "peerbench", "worker"] ++ Extra,
    Port = open_port({spawn_executable, "/bin/sh"}, [{args, Args}, exit_status]),
    Pid = record_pid(Port),
    put({pid, Node}, Pid),
    put(workers, [Node | case get(workers) of undefined -> []; W -> W end]),
    Node.

os_pid(Node) -> get({pid, Node}).

%% Append the OS pid behind Port to Dir/pids, for the script's cleanup.
record_pid(Port) ->
    {os_pid, Pid} = erlang:port_info(Port, os_pid),
    ok = file:write_file(filename:join(cfg(dir), "pids"), [integer_to_list(Pid), $\n], [append]),
    Pid.

kill_node(Node, Signal) ->
    case os_pid(Node) of
        undefined -> ok;
        Pid ->
            {0, _, _} = command(["/bin/kill", Signal, integer_to_list(Pid)]),
            Signal =:= "-9" andalso erase({pid, Node}),
            ok
    end.

stop_nodes(Nodes) ->
    _ = [kill_node(N, "-9") || N <- Nodes],
    ok.

stop_all_workers() ->
    case get(workers) of
        undefined -> ok;
        Nodes -> catch stop_nodes(Nodes)
    end.

rpc(Node, Fun, Args) -> rpc(Node, ?MODULE, Fun, Args).

rpc(Node, Mod, Fun, Args) ->
    case rpc:call(Node, Mod, Fun, Args, ?RPC_TIMEOUT_MS) of
        {badrpc, Reason} -> error({badrpc, Node, Fun, Reason});
        Value -> Value
    end.

%%% ------------------------------------------------------------ utilities

wait_until(Fun, TimeoutMs, What) ->
    Deadline = erlang:monotonic_time(millisecond) + TimeoutMs,
    wait_loop(Fun, Deadline, What).

wait_loop(Fun, Deadline, What) ->
    case Fun() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> error({timeout, What});
                false -> timer:sleep(20), wait_loop(Fun, Deadline, What)
            end
    end.

%% A file for a probe's result, unique in the run directory (every driver
%% of a run shares it).
result_file(Name) ->
    File = filename:join(cfg(dir), lists:concat([cfg(label), "-", cfg(phase), "-", Name, ".result"])),
    _ = file:delete(File),
    File.

wait_file(File) ->
    wait_until(fun() -> filelib:is_regular(File) end, 60000, {no_result, File}),
    {ok, [Term]} = file:consult(File),
    Term.

%% Run a program to its end; {exit status, microseconds from spawn to exit,
%% its output}.
command([Prog | Args]) ->
    T0 = erlang:monotonic_time(),
    Port = open_port({spawn_executable, Prog}, [{args, Args}, exit_status, stderr_to_stdout]),
    record_pid(Port),
    {Status, Output} = collect_exit(Port, [], 60000),
    {Status, elapsed_us(T0), Output}.

%% Microseconds a program took; it must exit 0 and print Expect (so that a
%% failed rpc is not timed as a success).
command_us(Prog, Args, Expect) ->
    case command([Prog | Args]) of
        {0, Us, Output} ->
            string:find(Output, Expect) =/= nomatch
                orelse error({unexpected_output, Prog, Args, Output}),
            Us;
        {Status, _, Output} ->
            error({command_failed, Prog, Args, Status, Output})
    end.

collect_exit(Port, Acc, TimeoutMs) ->
    receive
        {Port, {data, D}} -> collect_exit(Port, [Acc, D], TimeoutMs);
        {Port, {exit_status, S}} -> {S, lists:flatten(Acc)}
    after TimeoutMs -> error({command_timeout, erlang:port_info(Port)})
    end.

cpu_ticks(Pid) ->
    {ok, Stat} = file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/stat"),
    %% Fields after the parenthesised command name; utime and stime are
    %% fields 14 and 15 of the whole line.
    [_, After] = string:split(binary_to_list(Stat), ")", trailing),
    Fields = string:lexemes(After, " "),
    list_to_integer(lists:nth(12, Fields)) + list_to_integer(lists:nth(13, Fields)).

vm_rss_kib(Pid) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/status"),
    [Line] = [L || L <- string:lexemes(binary_to_list(Status), "\n"),
                   lists:prefix("VmRSS:", L)],
    [_, Kib | _] = string:lexemes(Line, " \t"),
    list_to_integer(Kib).

node_name(Node) -> atom_to_list(Node).

us_to_ms(L) -> [X / 1000 || X <- L].

row(Name, Values) ->
    Sorted = lists:sort(Values),
    io:format("| ~s | ~s | ~s | ~s | ~b |~n",
              [Name, num(pct(Sorted, 0.50)), num(pct(Sorted, 0.99)),
               num(lists:last(Sorted)), length(Sorted)]).

row_text(Name, Text) ->
    io:format("| ~s | ~s | | | 0 |~n", [Name, Text]).

%% Nearest-rank percentile of a sorted list.
pct(Sorted, Q) ->
    N = length(Sorted),
    lists:nth(max(1, min(N, ceil(Q * N))), Sorted).

num(X) when abs(X) >= 1000 -> integer_to_list(round(X));
num(X) when abs(X) >= 100 -> float_to_list(float(X), [{decimals, 1}]);
num(X) when abs(X) >= 1 -> float_to_list(float(X), [{decimals, 2}]);
num(X) -> float_to_list(float(X), [{decimals, 3}]).

log(Fmt, Args) ->
    io:format(standard_error, "  [~s] " ++ Fmt ++ "~n", [cfg_label() | Args]).

cfg_label() ->
    case get(cfg) of
        #{label := L} -> L;
        _ -> "erlang"
    end.
