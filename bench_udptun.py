"""udptun's benchmark, on demand: udptun against socat (the same wire
format) on the path a user's traffic takes (test_bench), each of the speed
layer's mechanisms left out in turn (the same test, see WITHOUT), two
clients' mixed load against another udptun.py (test_bench_mixed), a
stranger's flood (test_bench_flood), and the idle round trip alone, with
the tunnels taking turns (test_bench_idle). It builds the tests' namespace
lab (see test_udptun.py), as root:

    python3 -m pytest bench_udptun.py::test_bench -o markers=bench -s

Timings never decide pass or fail: the figures are printed, next to
those of a peer measured in the same run."""

import contextlib
import io
import ipaddress
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

import test_udptun
import udptun
from test_udptun import (HERE, Lab, NEW_FLOWS, WEB4, WEB6, end, need, rss_kib, running, start_pair, status, stop,
                         sysctl_in, wait_for)


# ================================================================ the full path, against socat
# Not part of the test run (the README's test commands name test_udptun.py
# alone). The figures are printed next to socat's, measured in the same
# run, as ratios:
#
#     python3 -m pytest bench_udptun.py::test_bench -o markers=bench -s
#
# UDPTUN_BENCH_REPS (3), UDPTUN_BENCH_TIME (5 s per iperf3 run) and
# UDPTUN_BENCH_IMPLS (socat,udptun,udptun-ipv6,udptun-plain; socat-ipv6,
# python-floor, udptun-old and the variants in WITHOUT on demand) tune it. Needs
# iperf3, ethtool and socat.
#
# It measures the path a user's traffic takes: from the laptop behind its
# home NAT, through the tunnel to the VPS, out of the VPS with NAT to the
# web host (203.0.113.80), where iperf3 listens. Every tunnel crosses the
# same firewall on the VPS, udptun's own (iptables_rules), and the same
# routes on the laptop: everything into the tunnel. The links behave like
# real NICs (see real_nics): UDP GSO batches are cut into wire packets
# where they leave a host, and GRO coalesces them at the receiver.
# Another peer, `python-floor`, is about the least a tunnel in Python can
# do: the loop below, with no checks, no queues and no batching, behind the
# same routes and firewall as socat. It is not a tunnel to use (it forwards
# anything from anyone); it shows what Python's wake-ups alone cost next to
# socat's: a floor for udptun's idle round trip.
PYTHON_FLOOR = """
import fcntl, os, select, socket, struct, subprocess, sys
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH22x", b"tun0", 0x1001))   # TUNSETIFF: IFF_TUN | IFF_NO_PI
address, server = sys.argv[1], sys.argv[2:]
subprocess.run(["ip", "address", "add", address, "dev", "tun0"], check=True)
subprocess.run(["ip", "link", "set", "tun0", "mtu", "1400", "up"], check=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if server:
    sock.connect((server[0], 5555))
    peer = sock.getpeername()
else:
    sock.bind(("0.0.0.0", 5555))
    peer = None
poller = select.epoll()
poller.register(tun, select.EPOLLIN)
poller.register(sock.fileno(), select.EPOLLIN)
while True:
    for fd, _ in poller.poll():
        if fd == tun:
            packet = os.read(tun, 65535)
            try:
                if server:
                    sock.send(packet)   # (connected: the kernel keeps the route)
                elif peer:
                    sock.sendto(packet, peer)
            except OSError:   # an ICMP error reported late: the other end is not there yet
                pass
        else:
            try:
                packet, peer = sock.recvfrom(65535)
            except OSError:
                continue
            os.write(tun, packet)
"""

# Each of chapter 9's mechanisms, left out of an otherwise whole speed
# layer, to measure what it brings (an A/B run on the full path): the
# variant runs udptun.py through a launcher that replaces one thing.
WITHOUT = {
    # one sendmsg() per datagram, as the plain loop sends
    "udptun-no-gso": "udptun.Batching.send_gso = lambda self, batch, size, addr: "
                     "[self.send_one(p, addr) for p in batch]",
    # one datagram per recvmsg(): never ask the kernel to coalesce them
    "udptun-no-gro": "udptun.enable_gro = lambda sock: None",
    # a TUN device without the vnet header: one write() per packet
    "udptun-no-merge": "udptun.VnetTun = type('Tun', (udptun.Tun,), {'skip': 0})",
    # one FIFO per direction, dropping at its tail when full, instead of the FairQueue
    "udptun-fifo": """
class Fifo:
    def __init__(self, limit=udptun.QUEUE_LIMIT, byte_limit=udptun.QUEUE_BYTES, **ignored):
        self.queue, self.limit, self.byte_limit = collections.deque(), limit, byte_limit
        self.length = self.bytes = 0
    def push(self, packets):
        dropped = 0
        for p in packets:
            if self.length >= self.limit or self.bytes + len(p) > self.byte_limit:
                dropped += 1
            else:
                self.queue.append(p)
                self.length += 1
                self.bytes += len(p)
        return dropped
    def room(self, hosts):
        return self.limit - self.length
    def pop(self, budget, byte_budget=udptun.QUEUE_BYTES, run_budget=None):
        runs, count, size, last = [], 0, 0, None
        while self.queue and count < budget and size < byte_budget:
            key = udptun.flow_of(self.queue[0])
            if key != last:
                if len(runs) == (run_budget or budget):
                    break
                runs.append([])
                last = key
            p = self.queue.popleft()
            runs[-1].append(p)
            count, size = count + 1, size + len(p)
        self.length -= count
        self.bytes -= size
        return runs
udptun.FairQueue = Fifo""",
}
LAUNCHER = """import collections, sys
sys.path.insert(0, {here!r})
import udptun
{patch}
sys.exit(udptun.main(sys.argv[1:]))
"""
# udptun-old runs another udptun.py, to compare with (UDPTUN_BENCH_OLD: its path).
OLD = os.environ.get("UDPTUN_BENCH_OLD")


@contextlib.contextmanager
def udptun_of(lab, impl):
    """Run this udptun, or one of its variants (WITHOUT, udptun-old), as `udptun`."""
    path = test_udptun.UDPTUN
    if impl in WITHOUT:
        test_udptun.UDPTUN = os.path.join(lab.tmp, f"{impl}.py")
        with open(test_udptun.UDPTUN, "w") as f:
            f.write(LAUNCHER.format(here=HERE, patch=WITHOUT[impl]))
    elif impl == "udptun-old":
        need(OLD, "udptun-old needs UDPTUN_BENCH_OLD, the path of the udptun.py to compare with")
        test_udptun.UDPTUN = OLD
    try:
        yield
    finally:
        test_udptun.UDPTUN = path


BENCH_REPS = int(os.environ.get("UDPTUN_BENCH_REPS", "3"))
BENCH_TIME = int(os.environ.get("UDPTUN_BENCH_TIME", "5"))


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


class Bench:
    """One tunnel's figures in one round: start it, measure, stop it."""

    def __init__(self, lab):
        self.lab = lab
        self.undo = []   # the socat run's routes and firewall, newest last

    def start(self, impl):
        """Start a tunnel; return (the web host's address, the tunnel's pids)."""
        lab = self.lab
        if impl == "python-floor":
            srv = lab.udptun_like("srv", [sys.executable, "-c", PYTHON_FLOOR, "10.0.0.2/24"])
            wait_for(lambda: ":5555" in lab.sh("srv", "ss", "-lun") and "tun0" in lab.sh("srv", "ip", "link"),
                     "the Python loop listening")
            cli = lab.udptun_like("cli1", [sys.executable, "-c", PYTHON_FLOOR, "10.0.0.1/24", "198.51.100.10"])
            wait_for(lambda: lab.ping("cli1", "10.0.0.2"), "a ping through the Python loop")
            self.socat_full_path()
            wait_for(lambda: lab.ping("cli1", WEB4), "the web host through the Python loop")
            return WEB4, [srv.pid, cli.pid]
        if impl in ("socat", "socat-ipv6"):
            srv = lab.udptun_like("srv", ["socat", "UDP-LISTEN:5555", "TUN:10.0.0.2/24,tun-name=tun0,iff-no-pi,iff-up"])
            wait_for(lambda: ":5555" in lab.sh("srv", "ss", "-lun"), "socat listening")
            cli = lab.udptun_like("cli1", ["socat", "UDP:198.51.100.10:5555",
                                           "TUN:10.0.0.1/24,tun-name=tun0,iff-no-pi,iff-up"])
            wait_for(lambda: "tun0" in lab.sh("cli1", "ip", "link"), "socat's tun0")
            lab.sh("cli1", "ip", "link", "set", "tun0", "mtu", "1400")
            lab.ping("cli1", "10.0.0.2")   # socat opens its server TUN on the first datagram
            wait_for(lambda: "tun0" in lab.sh("srv", "ip", "link"), "socat server's tun0")
            lab.sh("srv", "ip", "link", "set", "tun0", "mtu", "1400")
            self.socat_full_path()
            wait_for(lambda: lab.ping("cli1", WEB4), "the web host through socat")
            if impl == "socat":
                return WEB4, [srv.pid, cli.pid]
            self.socat_full_path_ipv6()
            wait_for(lambda: lab.ping("cli1", WEB6), "the web host through socat, over IPv6")
            return WEB6, [srv.pid, cli.pid]
        args = ["--plain"] if impl == "udptun-plain" else []
        with udptun_of(lab, impl):
            srv, cli = start_pair(lab, server_args=args, client_args=args)
        target = WEB6 if impl == "udptun-ipv6" else WEB4
        wait_for(lambda: lab.ping("cli1", target), "the web host through udptun")
        return target, [srv.pid, cli.pid]

    def socat_full_path(self):
        """What udptun does for itself: on the laptop, everything into the
        tunnel but the tunnel's own datagrams (two halves of the address
        space, and a route to the VPS by the home router, as OpenVPN's def1
        does); on the VPS, forwarding and udptun's firewall and NAT."""
        lab = self.lab
        steps = [("cli1", ["ip", "route", "add", "198.51.100.10/32", "via", "172.16.0.1"],
                  ["ip", "route", "del", "198.51.100.10/32"]),
                 ("cli1", ["ip", "route", "add", "0.0.0.0/1", "dev", "tun0"], ["ip", "route", "del", "0.0.0.0/1"]),
                 ("cli1", ["ip", "route", "add", "128.0.0.0/1", "dev", "tun0"],
                  ["ip", "route", "del", "128.0.0.0/1"]),
                 ("srv", ["sysctl", "-qw", "net.ipv4.ip_forward=1"], ["sysctl", "-qw", "net.ipv4.ip_forward=0"])]
        for name, do, undo in steps:
            lab.sh(name, *do)
            self.undo.append((name, undo))
        self.firewall("10.0.0.2/24")

    def firewall(self, address):
        commands, undos = firewall_of_udptun(address)
        for do in commands:
            self.lab.sh("srv", *do)
        self.undo += [("srv", undo) for undo in undos]   # (popped newest first)

    def socat_full_path_ipv6(self):
        """The same for IPv6 inside socat's tunnel (socat-ipv6, to compare
        with udptun-ipv6): udptun's addresses, routes, forwarding, firewall
        and NAT."""
        steps = [("cli1", ["ip", "-6", "address", "add", "fd75:6470:746e::1/64", "dev", "tun0", "nodad"], None),
                 ("srv", ["ip", "-6", "address", "add", "fd75:6470:746e::2/64", "dev", "tun0", "nodad"], None),
                 ("cli1", ["ip", "-6", "route", "add", "::/1", "dev", "tun0"], None),
                 ("cli1", ["ip", "-6", "route", "add", "8000::/1", "dev", "tun0"], None),
                 ("srv", ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=2"],
                  ["sysctl", "-qw", f"net.ipv6.conf.eth0.accept_ra={sysctl_in(self.lab, 'srv', 'net.ipv6.conf.eth0.accept_ra')}"]),
                 ("srv", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
                  ["sysctl", "-qw", f"net.ipv6.conf.all.forwarding={sysctl_in(self.lab, 'srv', 'net.ipv6.conf.all.forwarding')}"])]
        # (tun0's addresses and routes go with it)
        for name, do, undo in steps:
            self.lab.sh(name, *do)
            if undo:
                self.undo.append((name, undo))
        self.firewall("fd75:6470:746e::2/64")

    def stop(self):
        for p in reversed(self.lab.procs):
            if p.poll() is None:
                stop(p)
        self.lab.procs.clear()
        while self.undo:
            name, undo = self.undo.pop()
            self.lab.sh(name, *undo, check=False)
        # Until the devices are gone (socat's go when it exits; udptun's when it closes them).
        for name in ("cli1", "srv"):
            wait_for(lambda: "tun0" not in self.lab.sh(name, "ip", "link"), f"{name}'s tun0 gone")

    def iperf(self, target, *args):
        out = self.lab.sh("cli1", "iperf3", "-c", target, "-t", str(BENCH_TIME), "-J", *args,
                          timeout=BENCH_TIME + 30)
        return json.loads(out)["end"]

    def run(self, impl):
        target, pids = self.start(impl)
        r = {}
        try:
            # Idle first, on a quiet machine: 100 pings a second, and 5 (typing in ssh),
            # after 50 that go unmeasured (neighbour entries, NAT mappings, routes: for every tunnel alike).
            self.ping(target, 0.01, 50)
            r["ping100_p50"], r["ping100_p99"] = self.ping(target, 0.01, 300)
            r["ping5_p50"], r["ping5_p99"] = self.ping(target, 0.2, 5 * (BENCH_TIME + 3))
            before = cpu_seconds(pids)
            end = self.iperf(target)
            cpu = cpu_seconds(pids) - before
            r["tcp1"] = end["sum_received"]["bits_per_second"] / 1e9
            r["cpu_s_per_gb"] = cpu / (end["sum_received"]["bytes"] / 1e9)
            r["tcp1R"] = self.iperf(target, "-R")["sum_received"]["bits_per_second"] / 1e9
            r["tcp4"] = self.iperf(target, "-P", "4")["sum_received"]["bits_per_second"] / 1e9
            u = self.iperf(target, "-u", "-l", "64", "-b", "200M")["sum"]
            r["udp64_kpps"] = (u["packets"] - u["lost_packets"]) / u["seconds"] / 1e3
            for key, reverse in (("ping_load", []), ("ping_loadR", ["-R"])):   # upload, download
                with running(["ip", "netns", "exec", self.lab.ns("cli1"), "iperf3", "-c", target,
                              "-t", str(BENCH_TIME + 2), *reverse], stdout=subprocess.DEVNULL) as load:
                    wait_for(lambda: "5201" in self.lab.sh("cli1", "ss", "-tn", "state", "established"),
                             "iperf3 under way")
                    r[key], _ = self.ping(target, 0.05, 20 * BENCH_TIME)
                    load.wait(timeout=BENCH_TIME + 30)
        finally:
            self.stop()
        return r

    def ping(self, target, interval, count):
        """Round-trip time p50 and p99, in microseconds."""
        times = self.round_trips(target, interval, count)
        return percentile(times, 50), percentile(times, 99)

    def round_trips(self, target, interval, count):
        """Each answered ping's round-trip time, in microseconds (duplicates left out)."""
        out = self.lab.sh("cli1", "ping", "-c", str(count), "-i", str(interval), "-n", target,
                          check=False, timeout=count * interval + 30)
        return [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms$", out, re.MULTILINE)]


def firewall_of_udptun(address):
    """udptun's own firewall and NAT on the VPS, for a tunnel address: the
    commands, and their undos, oldest first. (Every tunnel compared passes
    the same firewall.)"""
    system = udptun.System(dry_run=True)
    changes = udptun.Changes(system, udptun.Journal("tun0", dry_run=True))
    with contextlib.redirect_stderr(io.StringIO()):   # (the dry run echoes its plan)
        udptun.add_firewall(changes, "iptables", udptun.Openings("tun0", "eth0", ipaddress.ip_interface(address), 1400))
    return system.plan, [argv for _, argv in changes.stack]


def real_nics(lab):
    """Make the veth links behave like real network cards (see topo.sh "real")."""
    for name, dev, features in (("cli1", "eth0", ["tx-udp-segmentation", "off", "gro", "on"]),
                                ("srv", "eth0", ["tx-udp-segmentation", "off", "gro", "on"]),
                                ("core", "e-srv", ["tso", "off", "tx-udp-segmentation", "off"]),
                                ("nat", "lan1", ["tso", "off", "tx-udp-segmentation", "off"])):
        lab.sh(name, "ethtool", "-K", dev, *features)


def lab_for_bench(blob=None, tag=""):
    """The tests' lab, under names of its own (`tag` tells several apart);
    the web host serves `blob` bytes."""
    lab = Lab()
    lab.prefix = f"ub{os.getpid()}{tag}"
    lab.names = [lab.ns(n) for n in ("cli1", "cli2", "nat", "core", "srv", "web", "iso", "prv")]
    if blob:
        lab.BLOB = blob

    def udptun_like(name, argv):   # (how Bench starts socat and python-floor)
        proc = subprocess.Popen(["ip", "netns", "exec", lab.ns(name), *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.log = io.StringIO()
        lab.procs.append(proc)
        return proc

    lab.udptun_like = udptun_like
    return lab


@pytest.mark.bench
def test_bench():
    need(os.geteuid() == 0, "the benchmark needs root")
    for tool in ("iperf3", "ethtool", "socat"):
        need(shutil.which(tool), f"the benchmark needs {tool}")
    lab = lab_for_bench()
    impls = os.environ.get("UDPTUN_BENCH_IMPLS", "socat,udptun,udptun-ipv6,udptun-plain").split(",")
    report(in_rounds(lab, impls, lambda name: Bench(lab).run(name)))


def in_turn(impls, rep):
    """The order of round `rep`: `impls`, and reversed every second round
    (A B, B A: over an even number of rounds, the machine's drift hits all
    alike)."""
    return impls if rep % 2 == 0 else impls[::-1]


def in_rounds(lab, impls, one_round):
    """Build the lab, with iperf3 listening on the web host; for each of
    BENCH_REPS rounds, one_round(name) for each of `impls` in turn (see
    in_turn); take the lab down. Returns {name: its rounds' results}."""
    results = {name: [] for name in impls}
    try:
        lab.up()
        real_nics(lab)
        with running(["ip", "netns", "exec", lab.ns("web"), "iperf3", "-s"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL):
            wait_for(lambda: ":5201" in lab.sh("web", "ss", "-ltn"), "iperf3 server on the web host")
            for rep in range(BENCH_REPS):
                for name in in_turn(impls, rep):
                    results[name].append(one_round(name))
                    print(f"rep {rep + 1} {name}: {results[name][-1]}", flush=True)
    finally:
        lab.down()
    return results


IDLE_ROUNDS = int(os.environ.get("UDPTUN_IDLE_ROUNDS", "20"))
IDLE_BLOCKS = {"100/s": (0.01, 60), "5/s": (0.2, 8)}   # each round's pings: interval (s), count


@pytest.mark.bench
def test_bench_idle():
    """The idle round trip alone, precise enough to tell a few percent
    apart. In test_bench a tunnel's idle p50 varies by 10% and more from
    one round to the next, as the machine's load drifts over the minutes
    between them. Here every tunnel of UDPTUN_BENCH_IMPLS
    (python-floor,udptun,udptun-plain) runs at once, each in a lab of its
    own, and the pings take turns between them (see in_turn), in blocks
    of IDLE_BLOCKS (60 at 100 a second, then 8 at 5 a second), IDLE_ROUNDS
    times: each tunnel's pings see the same machine. The figures are the p50 of
    all of a tunnel's pings, and its ratio to the first tunnel's."""
    need(os.geteuid() == 0, "the benchmark needs root")
    impls = os.environ.get("UDPTUN_BENCH_IMPLS", "python-floor,udptun,udptun-plain").split(",")
    for tool in ["ethtool"] + (["socat"] if any(name.startswith("socat") for name in impls) else []):
        need(shutil.which(tool), f"the benchmark needs {tool}")
    benches, targets = {}, {}
    rtts = {rate: {name: [] for name in impls} for rate in IDLE_BLOCKS}
    with contextlib.ExitStack() as stack:
        for i, name in enumerate(impls):
            lab = lab_for_bench(tag=chr(ord("a") + i))
            stack.callback(lab.down)   # (last: ExitStack undoes newest first)
            lab.up()
            real_nics(lab)
            benches[name] = Bench(lab)
            stack.callback(benches[name].stop)
            targets[name], _ = benches[name].start(name)
            benches[name].ping(targets[name], 0.01, 50)   # unmeasured, as in test_bench
        for rep in range(IDLE_ROUNDS):
            for rate, (interval, count) in IDLE_BLOCKS.items():
                for name in in_turn(impls, rep):
                    rtts[rate][name] += benches[name].round_trips(targets[name], interval, count)
        # (Printed before the labs go down: a teardown that fails loses no figure.)
        first = impls[0]
        p50 = {rate: {name: percentile(times, 50) for name, times in by_name.items()} for rate, by_name in rtts.items()}
        print(f"\nfull path, idle, {IDLE_ROUNDS} rounds of pings taking turns, p50 of each tunnel's:")
        print("| | " + " | ".join(f"{rate} | × {first}, {rate}" for rate in IDLE_BLOCKS) + " |")
        print("|---" * (1 + 2 * len(IDLE_BLOCKS)) + "|")
        for name in impls:
            print(f"| {name} | " + " | ".join(f"{p50[rate][name]:.0f} µs | {p50[rate][name] / p50[rate][first]:.2f}×"
                                             for rate in IDLE_BLOCKS) + " |")
    # An idle tunnel loses no ping in the lab: a lost one is a fault, not noise.
    for rate, (_, count) in IDLE_BLOCKS.items():
        for name in impls:
            assert len(rtts[rate][name]) == count * IDLE_ROUNDS, f"{name} lost pings at {rate}"


MIXED_TIME = int(os.environ.get("UDPTUN_MIXED_TIME", "180"))


@pytest.mark.bench
def test_bench_mixed():
    """Two clients at once, on the full path, for MIXED_TIME seconds: one
    with a TCP stream each way at 300 Mbit/s (iperf3 --bidir), the other
    fetching 20 MiB files from the web host back to back. What counts is
    the bytes the tunnel carried for both, each udptun of
    UDPTUN_BENCH_IMPLS (udptun,udptun-old: this one and UDPTUN_BENCH_OLD's)
    in turn, UDPTUN_BENCH_REPS rounds."""
    need(os.geteuid() == 0, "the benchmark needs root")
    need(shutil.which("iperf3"), "the benchmark needs iperf3")
    impls = os.environ.get("UDPTUN_BENCH_IMPLS", "udptun,udptun-old").split(",")
    lab = lab_for_bench(blob=20 << 20)
    results = in_rounds(lab, impls, lambda name: mixed_load(lab, name))
    print(f"\nfull path, two clients for {MIXED_TIME} s, medians of {BENCH_REPS} rounds, MB carried:")
    print("| | TCP up | TCP down | fetches | all |")
    print("|---|---|---|---|---|")
    keys = ("up", "down", "fetched", "all")
    med = medians(results, keys)
    for n, m in med.items():
        print(f"| {n} | " + " | ".join(f"{m[k]:.0f}" for k in keys) + " |")
    if "udptun" in med and "udptun-old" in med:
        print("| udptun / udptun-old | " + " | ".join(f"{med['udptun'][k] / med['udptun-old'][k]:.2f}×" for k in keys)
              + " |")


def mixed_load(lab, impl):
    """One round of test_bench_mixed: MB carried each way and fetched."""
    with udptun_of(lab, impl):
        start_pair(lab)
        lab.udptun("cli2", "client", "198.51.100.10", "--address", "10.0.0.3/24")
    try:
        # (through its tunnel: the web host answers directly too, until the client's routes are in)
        wait_for(lambda: lab.fetch("cli2", "/ip") == "198.51.100.10", "the second client's tunnel")
        with running(["ip", "netns", "exec", lab.ns("cli1"), "iperf3", "-c", WEB4, "--bidir", "-b", "300M",
                      "-t", str(MIXED_TIME), "-J"], stdout=subprocess.PIPE, text=True) as stream:
            fetched = subprocess.run(f"ip netns exec {lab.ns('cli2')} timeout {MIXED_TIME} curl -sS "
                                     f"--connect-timeout 3 'http://{WEB4}/blob?[1-100000]' | wc -c", shell=True,
                                     capture_output=True, text=True, timeout=MIXED_TIME + 30)
            end = json.loads(stream.communicate(timeout=60)[0])["end"]
    finally:
        Bench(lab).stop()
    up, down = end["sum_received"]["bytes"] / 1e6, end["sum_received_bidir_reverse"]["bytes"] / 1e6
    got = int(fetched.stdout) / 1e6
    return {"up": up, "down": down, "fetched": got, "all": up + down + got}


FLOOD_TIME = int(os.environ.get("UDPTUN_FLOOD_TIME", "60"))
# How fast the stranger floods: about as fast as udptun's server takes
# datagrams in on this lab, and as fast as one core sends them.
FLOOD_RATES = {"paced": 120000, "flat out": 10 ** 9}


def download_rate(lab, seconds):
    """MB/s that downloads from the web host (back to back, on the full
    path) get through the tunnel for `seconds`."""
    out = subprocess.run(f"ip netns exec {lab.ns('cli1')} timeout {seconds} curl -sS --connect-timeout 3 "
                         "'http://203.0.113.80/blob?[1-100000]' | wc -c", shell=True, capture_output=True,
                         text=True, timeout=seconds + 30)
    return int(out.stdout) / seconds / 1e6


@pytest.mark.bench
def test_bench_flood():
    """What a stranger's flood takes from a client's download, on the full
    path: downloads alone for FLOOD_TIME seconds; then while a stranger on
    the web host holds a free tunnel address and sends 64-byte packets,
    each from a new port (NEW_FLOWS), at each of FLOOD_RATES. Also: the
    server's RSS before and after, its longest turn (status), and a ping's
    round trip through the tunnel meanwhile.

    The flood's sender has a core of its own (the last one), as a
    stranger's machine would; everything else (udptun at both ends, the
    web host, the download, the kernel's work for them) shares the others,
    alone and flooded alike."""
    need(os.geteuid() == 0, "the benchmark needs root")
    cores = sorted(os.sched_getaffinity(0))
    need(len(cores) >= 2, "the flood benchmark needs two cores")
    saved, theirs = set(cores), str(cores[-1])
    lab = lab_for_bench()
    rows, taken = [], 0
    try:
        os.sched_setaffinity(0, cores[:-1])   # (inherited by all that the lab starts)
        lab.up()
        real_nics(lab)
        lab.sh("web", "iptables", "-I", "INPUT", "-p", "udp", "-s", "198.51.100.10", "-j", "DROP")   # quietly
        server, _ = start_pair(lab)
        alone = download_rate(lab, FLOOD_TIME)
        for name, rate in FLOOD_RATES.items():
            before = rss_kib(server.pid)
            with running(["taskset", "-c", theirs, "ip", "netns", "exec", lab.ns("web"), sys.executable, "-c",
                          NEW_FLOWS, HERE, str(10 ** 9), str(rate)]), \
                 running(["ip", "netns", "exec", lab.ns("cli1"), "ping", "-n", "-i", "0.2", "-w", str(FLOOD_TIME),
                          WEB4], stdout=subprocess.PIPE, text=True) as ping:
                flooded = download_rate(lab, FLOOD_TIME)
                rtt = [float(t) for t in re.findall(r"time=([\d.]+) ms", ping.communicate(timeout=30)[0])]
                stranger = [c for c in status(lab)["clients"] if c["ip"] == "10.0.0.9"]
            now = stranger[0]["rx_packets"] if stranger else 0
            rows.append((name, flooded, rss_kib(server.pid) - before, rtt, now - taken))
            taken = now
            lab.sh("srv", "conntrack", "-F", check=False)
        last = status(lab)
        longest = last["longest_turn_ms"], last["costliest_turn_ms"], last["turns_by_cpu_ms"]
    finally:
        lab.down()
        os.sched_setaffinity(0, saved)
    print(f"\nfull path, {FLOOD_TIME} s each; downloads alone: {alone:.1f} MB/s")
    print("| flood | download, MB/s | of alone | server RSS | ping p50 | ping p99 | pings answered | stranger's packets in |")
    print("|---|---|---|---|---|---|---|---|")
    for name, flooded, grown, rtt, took in rows:
        print(f"| {name} | {flooded:.1f} | {flooded / alone:.2f} | {grown / 1024:+.1f} MiB | {percentile(rtt, 50):.1f} ms "
              f"| {percentile(rtt, 99):.1f} ms | {len(rtt)} of {5 * FLOOD_TIME} | {took} |")
    print("longest turn of the server's loop: {} ms; its costliest: {} ms of CPU time; "
          "busy turns by their CPU time in ms: {}".format(*longest))


BENCH_COLUMNS = [("tcp1", "TCP up, Gbit/s", "{:.2f}"), ("tcp1R", "TCP down", "{:.2f}"),
                 ("tcp4", "TCP 4 up", "{:.2f}"), ("udp64_kpps", "64-byte UDP, kpps", "{:.0f}"),
                 ("cpu_s_per_gb", "CPU s/GB", "{:.1f}"),
                 ("ping100_p50", "ping 100/s p50 µs", "{:.0f}"), ("ping100_p99", "p99", "{:.0f}"),
                 ("ping5_p50", "ping 5/s p50", "{:.0f}"), ("ping5_p99", "p99", "{:.0f}"),
                 ("ping_load", "ping, upload p50", "{:.0f}"), ("ping_loadR", "download p50", "{:.0f}")]


def medians(results, keys):
    """{name: {key: the median of its rounds}} for the tunnels that ran."""
    return {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in results.items() if rs}


def report(results):
    keys = [k for k, _, _ in BENCH_COLUMNS]
    med = medians(results, keys)
    print(f"\nfull path, medians of {BENCH_REPS} rounds of {BENCH_TIME} s:")
    print("| | " + " | ".join(title for _, title, _ in BENCH_COLUMNS) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for n, m in med.items():
        print(f"| {n} | " + " | ".join(f.format(m[k]) for k, _, f in BENCH_COLUMNS) + " |")
    pairs = [(n, "socat") for n in med if n != "socat"] + [(f"{n}-ipv6", n) for n in ("udptun", "socat")]
    for n, d in dict.fromkeys(pairs):
        if n in med and d in med:
            print(f"| {n} / {d} | " + " | ".join(
                f"{med[n][k] / med[d][k]:.2f}×" if med[d][k] else "-" for k in keys) + " |")
