%% Erlang distribution under the load `clusterctl bench` puts on the data path, for comparison.
%%
%% Node B runs a `sink` process (counts messages) and a `pong` process; node A sends COUNT
%% messages of 100 bytes and of 64 KiB to B's sink, then asks the sink for its count (a pair of
%% processes keeps message order, so the answer comes after every message), and measures ping
%% round trips to `pong`, idle and while a 64 KiB transfer to the sink saturates the connection.
%%
%%   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
%%     -keyout key.pem -out cert.pem -days 2 -subj /CN=erl
%%   cat > ssl_dist.conf   # [{server, [{certfile, "cert.pem"}, {keyfile, "key.pem"}, {verify, verify_none}, {versions, ['tlsv1.3']}]},
%%                         #  {client, [{certfile, "cert.pem"}, {keyfile, "key.pem"}, {verify, verify_none}, {versions, ['tlsv1.3']}]}].
%%   erlc dist_load.erl
%%   export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=4399; epmd -port 4399 -address 127.0.0.1 &
%%   TLS="-proto_dist inet_tls -ssl_dist_optfile $PWD/ssl_dist.conf"
%%   erl -noshell -name b@127.0.0.1 -setcookie c $TLS -eval 'dist_load:start_sink().' &
%%   erl -noshell -name a@127.0.0.1 -setcookie c $TLS -run dist_load run b@127.0.0.1 200000 5000 3
%%
%% Arguments of `run`: the sink node, messages per 100-byte run, messages per 64 KiB run, runs.
%% The loaded transfer is 4 x the 64 KiB count; pings start 300 ms into it.
-module(dist_load).
-export([sink/0, start_sink/0, run/1, pong/0]).

%% Sink node: counts messages; answers {get, From} with the count (dist keeps pair order).
start_sink() ->
    register(sink, spawn(fun() -> sink_loop(0) end)),
    register(pong, spawn(fun pong/0)),
    ok.
sink() -> sink_loop(0).
sink_loop(N) ->
    receive
        {get, From} -> From ! {count, N}, sink_loop(N);
        reset -> sink_loop(0);
        _Msg -> sink_loop(N + 1)
    end.
pong() -> receive {ping, From} -> From ! pong, pong() end.

now_us() -> erlang:monotonic_time(microsecond).

throughput(B, Count, Size) ->
    Bin = binary:copy(<<16#a5>>, Size),
    {sink, B} ! reset,
    T0 = now_us(),
    send_n({sink, B}, Bin, Count),
    {sink, B} ! {get, self()},
    receive {count, C} -> ok end,
    Secs = (now_us() - T0) / 1.0e6,
    {C, Secs, C / Secs, C * Size / Secs / 1.0e6}.

send_n(_, _, 0) -> ok;
send_n(To, Bin, N) -> To ! Bin, send_n(To, Bin, N - 1).

pings(B, N) -> [begin T = now_us(), {pong, B} ! {ping, self()}, receive pong -> (now_us() - T) / 1000 end end || _ <- lists:seq(1, N)].

pct(L, Q) -> S = lists:sort(L), lists:nth(max(1, round(Q * length(S))), S).

run([BStr, SmallN, LargeN, Runs]) ->
    B = list_to_atom(BStr),
    pong = net_adm:ping(B),
    SN = list_to_integer(SmallN), LN = list_to_integer(LargeN), R = list_to_integer(Runs),
    Small = [element(3, throughput(B, SN, 100)) || _ <- lists:seq(1, R)],
    Large = [element(4, throughput(B, LN, 65536)) || _ <- lists:seq(1, R)],
    Idle = pings(B, 300),
    Self = self(),
    Loader = spawn(fun() -> Self ! {loaded, throughput(B, LN * 4, 65536)} end),
    timer:sleep(300),
    Loaded = pings(B, 300),
    receive {loaded, {_, _, _, MBs}} -> ok end,
    _ = Loader,
    io:format("100-byte msgs/s runs: ~w~n", [[round(X) || X <- Small]]),
    io:format("64KiB MB/s runs: ~w~n", [[round(X) || X <- Large]]),
    io:format("ping idle ms p50 ~.2f p99 ~.2f max ~.2f~n", [pct(Idle, 0.5), pct(Idle, 0.99), lists:max(Idle)]),
    io:format("ping under 64KiB load (~w MB/s): first ~.2f ms, then p50 ~.2f p99 ~.2f max ~.2f (~w samples)~n",
              [round(MBs), hd(Loaded), pct(Loaded, 0.5), pct(Loaded, 0.99), lists:max(Loaded), length(Loaded)]),
    halt().
