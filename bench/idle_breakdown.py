#!/usr/bin/env python3
"""Where an agent's idle bytes go: every QUIC packet it sent in a window, classified.

The agent must run with quinn's packet trace on, e.g. a lab started with

    CLUSTERCTL_LOG="info,quinn=debug,quinn_proto=trace" clusterctl lab up --dir DIR ...

quinn then logs, per connection (`drive{id=N}`), the frames it writes into each packet
(`send{space=Data pn=..}: ACK ...`, `PING`, `DATAGRAM len=..`, `STREAM ... len=..`,
`IMMEDIATE_ACK`), what triggered it (`max ack delay reached`, `sending keep-alive`,
`PTO fired`) and then `sending N bytes in M datagrams`. This groups those lines into packets
and classes:

  datagram            a failure-detector (SWIM) datagram, with any ACK frame riding along
  ack-only(delayed)   ACK alone, max_ack_delay (25 ms) after a packet nothing answered
  ack-only(immediate) ACK alone, sent at once: a peer's IMMEDIATE_ACK (its PTO probe), or a
                      second ack-eliciting packet not yet acknowledged
  keepalive-ping      PING after `keep_alive_interval` without receiving anything
  pto-probe           probe packets after a probe timeout (spurious on loopback: the timer
                      races the peer's delayed ack); pto-probe(X) when they carried X
  stream-summary      table frames of at most 20 bytes (anti-entropy summaries)
  stream-records      larger table frames (records, digests, site summaries, routed frames)
  mtu-probe, other    MTU discovery, handshakes, connection-ID frames

Usage: idle_breakdown.py AGENT_LOG START SECONDS
  START: UTC time the window starts, e.g. 2026-11-22T11:18:00 (the log's own timestamps)
Prints packets/s and bytes/s per class, as UDP payload and at IP level (+28 bytes per datagram).
"""
import collections
import datetime
import re
import sys

DRIVE = re.compile(r"drive\{id=(\d+)\}")
SENT = re.compile(r"sending (\d+) bytes in (\d+) datagrams")
LEN = re.compile(r"len=(\d+)")


def stamp(line):
    return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc
    )


def classify(frames, trigger):
    kinds = {f.split(":")[0] for f in frames}
    if "MTUD" in kinds:
        return "mtu-probe"
    if "DATAGRAM" in kinds:
        cls = "datagram"
    elif "STREAM" in kinds:
        lens = [int(f.split(":")[1]) for f in frames if f.startswith("STREAM:")]
        cls = "stream-summary" if lens and max(lens) <= 20 else "stream-records"
    elif trigger == "pto" or "IMMEDIATE_ACK" in kinds:
        return "pto-probe"
    elif "PING" in kinds:
        cls = "keepalive-ping"
    elif kinds and kinds <= {"ACK", "PADDING"}:
        cls = "ack-only(" + (trigger or "immediate") + ")"
    else:
        cls = "other:" + ",".join(sorted(kinds))
    return "pto-probe(" + cls + ")" if trigger == "pto" else cls


def main():
    path, start, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    t0 = datetime.datetime.fromisoformat(start).replace(tzinfo=datetime.timezone.utc)
    t1 = t0 + datetime.timedelta(seconds=secs)
    frames = collections.defaultdict(list)
    trigger = collections.defaultdict(str)
    pkts = collections.Counter()
    octets = collections.Counter()
    for line in open(path, errors="replace"):
        m = DRIVE.search(line)
        if not m or len(line) < 27:
            continue
        d = m.group(1)
        if "max ack delay reached" in line:
            trigger[d] = "delayed"
        elif "PTO fired" in line:
            trigger[d] = "pto"
        elif "sending keep-alive" in line:
            trigger[d] = "keepalive"
        elif "writing MTUD probe" in line:
            frames[d].append("MTUD")
        if "send{space=" in line:
            f = line.rsplit("}: ", 1)[-1].strip()
            name = f.split()[0].rstrip(",")
            if name == "STREAM":
                n = LEN.search(f)
                name += ":" + (n.group(1) if n else "0")
            frames[d].append(name)
            continue
        m = SENT.search(line)
        if not m:
            continue
        why = trigger.pop(d, "")
        cls = classify(frames.pop(d, []), "pto" if why.startswith("pto") else why)
        if why == "pto":
            # A probe timeout sends two probe packets.
            trigger[d] = "pto-second"
        try:
            t = stamp(line)
        except ValueError:
            continue
        if t0 <= t < t1:
            pkts[cls] += int(m.group(2))
            octets[cls] += int(m.group(1))
    n, b = sum(pkts.values()), sum(octets.values())
    print(f"{path}: {n / secs:.1f} packets/s, {b / secs:.0f} B/s UDP, {(b + 28 * n) / secs:.0f} B/s IP")
    for c in sorted(octets, key=lambda c: -(octets[c] + 28 * pkts[c])):
        print(
            f"  {c:28s} {pkts[c] / secs:6.2f} pkt/s {octets[c] / secs:7.1f} B/s UDP "
            f"{(octets[c] + 28 * pkts[c]) / secs:7.1f} B/s IP  ({octets[c] / pkts[c]:.0f} B/packet)"
        )


if __name__ == "__main__":
    main()
