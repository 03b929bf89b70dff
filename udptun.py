#!/usr/bin/env python3
"""udptun: an IP-over-UDP tunnel (a small VPN without encryption) in one file.

A client reads every IP packet (IPv4 and IPv6) the laptop sends from a TUN
device and sends it, unchanged, as the payload of one UDP datagram to a server. The
server writes it to its own TUN device, and the server's kernel forwards it
to the internet with NAT, so websites see the server's address. Replies
take the same path backwards.

    laptop (client)                                      VPS (server)
    app --> kernel --> tun0 10.0.0.1                     tun0 10.0.0.2 --> kernel --NAT--> internet
                        |  read()                          ^  write()
                        v                                  |
                      udptun client --UDP 5555 (raw IP)--> udptun server
                        ^                                  |
                        |  write()                         v  read()
    app <-- kernel <-- tun0        <--UDP (raw IP)--      tun0 <-- kernel <----- replies

Usage (as root):
    python3 udptun.py server                    # on the VPS
    python3 udptun.py client VPS_ADDRESS        # on the laptop
    python3 udptun.py down                      # undo what a killed run left behind
    python3 udptun.py status                    # who is connected, what was dropped
    python3 udptun.py server --dry-run          # print every command, change nothing

The wire format is one raw IP packet per datagram, IPv4 or IPv6 (the version
nibble tells them apart), with no header of our own, so a `socat UDP:...
TUN:...,iff-no-pi` peer works on either side. The datagrams travel over IPv4
or IPv6.

WARNING: no encryption, no authentication. Anyone on the path between client
and server can read, change and inject traffic, and anyone who can reach the
server's UDP port can send packets out through it to the internet (and
nowhere else: see the server's firewall rules and ClientTable).
Use WireGuard or OpenVPN when that matters.

How the file reads: as a lesson, in chapters, each under a banner
(search for "# ====="). Read 1 to 5 and you know how a tunnel works; the
rest is what makes it safe to run, and fast.

  1. What a tunnel is: this text; then the imports and constants.
  2. Plumbing: UserError, log, System (the one place that runs commands),
     Changes (the stack of undos).
  3. Packets: pure functions on bytes, IPv4 and IPv6 headers checked.
  4. The TUN device and the UDP socket: Tun (and FakeTun, for --dry-run);
     open_udp_socket, listen, connect_udp, resolve.
  5. The plain forwarding loop: Forwarder. One packet in, one packet out;
     the whole tunnel, with hooks for what may pass.
  6. The server's policy: ClientTable (who owns a tunnel address), Server
     (what may pass, where replies go).
  7. The client: Client (what may come in, keepalives, a laptop whose
     network changes, routing that other programs change).
  8. System changes and their undo: the device, sysctls, the server's
     firewall (iptables or nft), the client's routing (Routing) and kill
     switch, the resolver; the Journal, and recovery after a crash.
  9. Going faster: Batching, a layer mixed into Server and Client
     (FastServer, FastClient) that moves many packets per system call:
     UDP GSO and GRO, merged writes (VnetTun, MergingWriter, with mergeable
     and merge), fair queues (FairQueue). `--plain` leaves it out, and the
     tunnel works the same.
 10. The command line: the checks of what the user typed; run_server,
     run_client (with connect_client and forward), run_down, run_status;
     main.
"""


# ================ 1. What a tunnel is (above); imports and constants
import argparse
import bisect
import contextlib
import errno
import fcntl
import functools
import gc
import ipaddress
import json
import os
import queue
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from itertools import accumulate, chain, groupby

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>: #define TUNSETIFF _IOW('T', 202, int)
#   = direction write (1 << 30) | sizeof(int) (4 << 16) | 'T' (0x54 << 8) | 202
# (as x86 and ARM encode ioctls, <asm-generic/ioctl.h>; MIPS, PowerPC and
# SPARC put the direction elsewhere, and udptun does not run there as is)
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001     # <linux/if_tun.h>: layer-3 device, packets start at the IP header
IFF_NO_PI = 0x1000   # <linux/if_tun.h>: no 4-byte packet-info prefix on read()/write()
IFNAMSIZ = 16        # <linux/if.h>: interface names are at most 15 bytes plus NUL

IFF_TUN_EXCL = 0x8000   # <linux/if_tun.h>: fail (EBUSY) if a device of that name exists already

# <linux/in.h>: IP_MTU_DISCOVER and IP_PMTUDISC_DONT ("never send DF frames").
# Python's socket module does not export them.
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0

# <asm-generic/socket.h>: set buffer sizes past net.core.[rw]mem_max (needs CAP_NET_ADMIN).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# Kernel-default socket buffers (about 200 KiB) overflow when a burst
# arrives while we are busy with the other direction; 4 MiB absorbs it.
SOCKET_BUFFER = 4 << 20
# A client's own socket (see socket_for) needs less: a few milliseconds of
# a fast upload. (The kernel doubles both, for its bookkeeping.)
CLIENT_SOCKET_BUFFER = 512 << 10

# Every tunnelled packet gains an outer IPv4 header (20 bytes, RFC 791) and
# a UDP header (8 bytes, RFC 768): 28 bytes. On a 1500-byte Ethernet path the
# tunnel could carry 1472-byte packets, but many real paths are smaller
# (PPPoE takes 8 bytes, DS-Lite 40, another tunnel more). 1400 leaves 72
# bytes to spare over IPv4, 52 over IPv6 (WireGuard's 1420 spares none over
# IPv6: its 80 bytes are its own headers there). Paths smaller still
# are handled by letting routers fragment the outer datagram (see
# open_udp_socket) and by clamping TCP MSS on the server.
OUTER_OVERHEAD = 28   # over IPv6 it is 48: a 40-byte header (RFC 8200) and UDP's 8
DEFAULT_MTU = 1400
DEFAULT_PORT = 5555

# Inside the tunnel each end also has an IPv6 address, from a unique local
# /64 (RFC 4193: fd00::/8, then a 40-bit global ID that should be random;
# ours spells "udptn" in ASCII, 75 64 70 74 6e). An end's IPv6 address has
# the host number of its IPv4 one: 10.0.0.1/24 goes with fd75:6470:746e::1.
DEFAULT_SUBNET6 = "fd75:6470:746e::/64"
MAX_PACKET = 65535   # largest IPv4 packet (16-bit total length, RFC 791)

# How many of its clients' sockets the server reads in one turn of the
# loop (see Server.read_clients), whatever the number of busy senders.
MAX_EVENTS = 8

# The client's keepalive interval (25 s) is WireGuard's: short enough for home NAT
# routers that forget idle UDP mappings after 30 s (RFC 4787 asks for at
# least 2 minutes, but many do less).
DEFAULT_KEEPALIVE = 25

# A client's binding moves to a new port of the same outer IP (a NAT
# rebinding) only once its old port has been quiet this long (see ClientTable).
REBIND_QUIET = 1.0

# RFC 4787 REQ-5: a NAT's UDP mapping must live at least 2 minutes; we keep
# an idle binding at least as long as a compliant NAT would.
DEFAULT_CLIENT_TIMEOUT = 180

# A different outer IP may take over a tunnel address only after its owner
# has been silent this long. Longer protects better against a stranger
# taking the address; shorter lets a client whose home address changed
# (new DHCP lease, mobile network) come back sooner. 60 s is more than two
# keepalive intervals, so one lost keepalive never opens the door.
DEFAULT_REBIND_AFTER = 60

# How many tunnel addresses one outer IP address may hold at once: a home
# NAT with a few laptops, each with an IPv4 and an IPv6 address, not one
# stranger taking the whole subnet.
DEFAULT_MAX_PER_HOST = 16

# How many connections one tunnel address may have open through the VPS at
# once (see iptables_rules): a browser opens a few hundred at most, a
# BitTorrent client a thousand or two.
DEFAULT_MAX_CONNECTIONS = 4096
# How fast one tunnel address may open new ones: a page load opens a few
# dozen at once, a resolver one per query. The kernel counts a host's open
# connections by walking the list of them, for every new one; this limit,
# a token bucket per address, drops a flood of new flows before that walk.
NEW_CONNECTIONS_PER_SECOND, NEW_CONNECTIONS_BURST = 100, 1000
STATE_ROOT = "/run/udptun"

# The client sends everything into the tunnel by policy routing, as wg-quick
# does (see Routing, in chapter 8): its own datagrams carry a firewall mark
# and skip the tunnel's routing table. The mark and the table share a number,
# the first one from FIRST_TABLE that no routing rule or table uses yet.
FIRST_TABLE = 5555

# The metric of the "unreachable" twin of each tunnel route (see
# Routing): the largest, so it counts only once the real one is gone.
LAST_RESORT = 4294967295
RESOLV_CONF = "/etc/resolv.conf"


# ================ 2. Plumbing: errors, logging, commands, and the stack of undos
# What every other chapter leans on. An error the user can act on is a
# UserError, printed as one line. Every change to the system goes through
# System (the one place that runs a command, echoing it as `[#] ...`) and is
# pushed on Changes with its undo, which a journal keeps on disk so that a
# run killed with -9 is undone by the next one, or by `down` (see Journal,
# in chapter 8).
class UserError(Exception):
    """Something the user can fix: printed as one line, with the fix, and exit 1."""


class Stop(Exception):
    """Raised by the SIGTERM, SIGINT and SIGHUP handler (on_signal, in
    chapter 10) so that every undo runs."""


def log(message):
    print(message, file=sys.stderr, flush=True)


class LogLimit:
    """Logs at most `burst` lines of each kind per `window` seconds. The
    next line that gets through says how many were left out, so a flood of
    hostile datagrams costs a few lines of log, not one each, and the log
    still says it happened. Kinds are a few fixed words: the table is small."""

    def __init__(self, burst=10, window=10.0):
        self.burst, self.window = burst, window
        self.kinds = {}   # kind -> [start of its window, lines logged in it, lines left out]

    def __call__(self, kind, message, now):
        state = self.kinds.setdefault(kind, [now, 0, 0])
        if now - state[0] >= self.window:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return
        state[1] += 1
        if state[2]:
            message += f" (and {state[2]} more like it, not logged)"
            state[2] = 0
        log(message)


# Which package to install when a command is missing (Debian/Ubuntu names).
PACKAGES = {"ip": "iproute2", "iptables": "iptables", "ip6tables": "iptables", "nft": "nftables"}


class System:
    """Runs commands: the only place this file calls subprocess.

    Every command is echoed as `[#] command`, so the log is a transcript of
    what was done. With dry_run=True, commands that change the system are
    printed and recorded in `plan` but not run; queries (which only read)
    still run, so the plan is the one a real run would follow.

    Two commands are done here, not run:
    - `sysctl -w KEY=VALUE [TAG [RULE...]]` writes VALUE to /proc/sys/KEY,
      as sysctl(8) would, so a minimal image needs no procps. With TAG
      (udptun:DEV), the undo of turning forwarding on (or of the accept_ra
      that goes with it), it does so only if the firewall holds no rule
      but TAG's and the RULEs (see forwarding_for_others, in chapter 8).
      The RULEs were there when forwarding went on, so they never needed
      it (a host firewall, ufw's or firewalld's); Docker, or another VPN,
      started since may rely on it now.
    - `write PATH TEXT [ONLY_IF]` puts TEXT in a file in place (a
      bind-mounted /etc/resolv.conf cannot be replaced by rename); with
      ONLY_IF, only if the file still holds ONLY_IF, so an undo never
      clobbers what another program wrote since. Its text is kept as
      latin-1, which maps every byte to one character, so the journal
      (JSON) restores a file byte for byte.
    """

    def __init__(self, dry_run=False):
        self.dry_run = dry_run
        self.plan = []   # every change, in the order made (and undone)

    def _run(self, argv, check, input=None):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, input=input)
        except FileNotFoundError:
            raise UserError(f"{argv[0]} not found: install it "
                            f"(apt-get install {PACKAGES.get(argv[0], argv[0])})") from None
        if check and done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise UserError(f"`{shlex.join(argv)}` failed: {why[-1] if why else done.returncode}")
        return done

    def query(self, *argv, check=True):
        """Run a read-only command and return its output."""
        log("[#] " + shlex.join(argv))
        return self._run(argv, check).stdout

    def change(self, *argv, check=True, input=None):
        """Run a command that changes the system (only echo it in a dry run).
        `input` goes to its standard input. If it fails: a UserError, or with
        check=False, what it said (None when it worked)."""
        if argv[0] == "write":
            lines = [line for line in argv[2].splitlines() if line and not line.startswith("#")]
            log(f"[#] write {argv[1]}: " + "; ".join(lines)
                + (" (if it still holds what we wrote)" if len(argv) > 3 else ""))
        elif argv[0] == "sysctl" and len(argv) > 3:
            log("[#] " + shlex.join(argv[:3]) + f" (unless firewall rules other than {argv[3]}'s came since)")
        else:
            log("[#] " + shlex.join(argv) + (f" <<< {shlex.quote(input.strip())}" if input else ""))
        self.plan.append(list(argv))
        if self.dry_run:
            return
        if argv[0] == "write":
            return self._write(*argv[1:], check=check)
        if argv[0] == "sysctl":
            return self._sysctl(*argv[2:], check=check)
        try:
            done = self._run(argv, check, input)
        except UserError as e:   # (its tool is missing: an undo that fails, and the others still run)
            if check:
                raise
            log(f"    (failed: {e})")
            return str(e)
        if done.returncode != 0:
            error = (done.stderr or done.stdout or f"exit status {done.returncode}").strip()
            log(f"    (failed: {error})")
            return error
        return None

    def again(self, *argv):
        """Make a change that may be in place still: a command that fails
        with "File exists" if so (`ip rule add` with a priority, `ip route
        add`), and is then not shown. Return whether it changed something."""
        done = self._run(argv, check=False)
        if done.returncode != 0:
            if "File exists" not in done.stderr:
                log(f"udptun: warning: could not put back `{shlex.join(argv)}`: {done.stderr.strip()}")
            return False
        log("[#] " + shlex.join(argv))
        self.plan.append(list(argv))
        return True

    def _sysctl(self, setting, unless=None, *before, check=True):
        key, value = setting.split("=", 1)
        if unless:
            others = Counter(forwarding_for_others(self, sysctl_version(key), unless))
            others -= Counter(before)   # (a rule there twice, and once before, is a new one)
            if others:
                log(f"    (left as it is: firewall rules came since, such as `{next(iter(others))}`)")
                return None
        try:
            with open(sysctl_path(key), "w") as f:   # (sysctl_path: in chapter 8)
                f.write(value + "\n")
        except OSError as e:
            return self._failed(e, f"cannot set {key}", check)
        return None

    @staticmethod
    def _write(path, text, only_if=None, check=True):
        try:
            with open(path, "r+b") as f:   # in place: the same file, not a new one
                if only_if is not None and f.read() != only_if.encode("latin-1"):
                    log(f"udptun: warning: {path} was changed by another program: left as it is")
                    return
                f.seek(0)
                f.write(text.encode("latin-1"))
                f.truncate()
        except OSError as e:
            return System._failed(e, f"cannot write {path}", check)
        return None

    @staticmethod
    def _failed(error, what, check):
        """A change of ours that failed: a UserError, or with check=False,
        what went wrong (see change)."""
        if check:
            raise UserError(f"{what}: {error.strerror}") from None
        log(f"    (failed: {error.strerror})")
        return error.strerror


class Changes:
    """Every change this run makes, each paired with its undo, on one stack.

    The stack unwinds newest first when the `with` block ends, however it
    ends: a clean stop, a signal, or an error halfway through setup. An undo
    that fails is logged and the rest still run; unless what it undoes is
    gone already, it stays in the journal for `down` to try again. Changes
    that something else undoes carry `undo=None`: addresses and routes on
    our TUN device vanish with it (the kernel's work), and nft rules go with
    their table. `leftovers` are undos an earlier run left that could not
    be done yet (see recover, in chapter 8): they wait at the bottom of
    the stack.
    """

    def __init__(self, system, journal, leftovers=()):
        self.system = system
        self.journal = journal
        self.stack = [("cmd", argv) for argv in leftovers]   # (kind, payload): "cmd" argv | "call" (function, text)
        self.kept = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.kept:
            self.leave()
        else:
            self.undo_all()

    def keep(self):
        """Leave the system changed when the `with` block ends: the client
        that fails keeps its routes (see connect_client)."""
        self.kept = True

    def leave(self):
        """Undo only what a process's end undoes anyway (the TUN device
        closes, the status file goes); the rest stays in the journal, for
        `down` or the next start, as after kill -9."""
        for kind, payload in reversed(self.stack):
            if kind == "call":
                self._call(*payload)
        self.journal.release()

    @staticmethod
    def _call(function, description):
        log(f"[#] {description}")
        try:
            function()
        except OSError as e:
            log(f"udptun: warning: undo failed: {e}")

    def _commands(self):
        return [argv for kind, argv in self.stack if kind == "cmd"]

    def make(self, do, undo=None, input=None):
        """Make one change: run `do`, and remember `undo` to reverse it."""
        if undo is not None:
            self.stack.append(("cmd", undo))
            self.journal.save(self._commands())
        try:
            self.system.change(*do, input=input)
        except UserError:
            if undo is not None:   # the command failed: nothing to undo
                self.stack.pop()
                self.journal.save(self._commands())
            raise
        # A signal in the middle of the command keeps the undo: the change
        # may have happened, and undoing one that did not only fails harmlessly.

    def amend(self, undo, new):
        """Replace the undo `undo` with `new`, in its place: what we changed
        was changed again since, by someone else, and then by us."""
        at = len(self.stack) - 1 - self.stack[::-1].index(("cmd", undo))   # (ours: the newest such)
        self.stack[at] = ("cmd", new)
        self.journal.save(self._commands())

    def defer(self, function, description):
        """Undo by calling a function (closing the TUN device, say)."""
        self.stack.append(("call", (function, description)))

    def undo_all(self):
        # A second Ctrl-C must not stop the undo halfway.
        saved = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):   # not the main thread (tests)
                saved[sig] = signal.signal(sig, signal.SIG_IGN)
        failed = []
        while self.stack:
            kind, payload = self.stack.pop()
            if kind == "cmd":
                error = self.system.change(*payload, check=False)
                if error and not already_undone(error):
                    failed.insert(0, payload)
                    log(f"udptun: warning: could not undo; `udptun.py down` will try again: {error}")
            else:
                self._call(*payload)
            self.journal.save(failed + self._commands())
        self.journal.release()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def already_undone(error):
    """Whether a failed undo failed because there was nothing left to undo:
    the rule, route, table or device is gone (a stale journal entry, or the
    kernel got there first)."""
    return any(text in error for text in ("No such file or directory", "No such process", "does not exist",
                                          "Bad rule", "Cannot find device", "No such device",
                                          "No chain/target/match by that name"))


def sd_notify(state):
    """Tell systemd (Type=notify) how we are: see sd_notify(3). The protocol is
    one datagram to the AF_UNIX socket named in $NOTIFY_SOCKET; a leading
    '@' means the Linux abstract namespace."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        with contextlib.suppress(OSError):
            s.sendto(state.encode(), path)


# ================ 3. Packets
# Pure functions on bytes, no I/O: the tests feed them hand-built packets.
# A tunnel needs to know little about what it carries: the version, the
# lengths (to refuse what is malformed), and the addresses (to know whose
# it is). Each field is read through a name below, never a bare index.
#
# The IPv4 header (RFC 791), 20 bytes and options, offsets in bytes:
#    0: version (4 bits) | IHL, header length in 32-bit words (4 bits)
#    1: type of service     2: total length (16 bits)    4: identification
#    6: flags (3 bits) | fragment offset (13 bits)       8: time to live
#    9: protocol           10: header checksum
#   12: source address     16: destination address
VERSION = 0   # (in both versions: the first 4 bits of the first byte)
IPV4_LENGTH = slice(2, 4)
IPV4_ID = slice(4, 6)
IPV4_FRAGMENT = slice(6, 8)
IPV4_PROTOCOL = 9
IPV4_CHECKSUM = slice(10, 12)
IPV4_SRC, IPV4_DST = slice(12, 16), slice(16, 20)
IPV4_HEADER = 20   # without options
IPV4_NO_OPTIONS = 0x45   # the first byte of such a header: version 4, IHL 5
# Reading a 16-bit field with unpack_from costs half what int.from_bytes of
# a slice does; it matters where it runs for every packet. IPv4's checks
# read the first byte and the total length with one (IPV4_START).
BE16 = struct.Struct("!H")   # network byte order: big-endian
IPV4_START = struct.Struct("!BxH")   # version | IHL, (type of service), total length
# The IPv6 header (RFC 8200) is 40 bytes, with no options (they follow as
# extension headers) and no checksum:
#    0: version (4 bits) | traffic class | flow label
#    4: payload length, what follows these 40 bytes (16 bits)
#    6: next header (6 = TCP, 17 = UDP)    7: hop limit
#    8: source address (16 bytes)          24: destination address (16 bytes)
IPV6_LENGTH = slice(4, 6)
IPV6_NEXT = 6
IPV6_SRC, IPV6_DST = slice(8, 24), slice(24, 40)
IPV6_HEADER = 40
TCP, UDP = 6, 17   # IP protocol numbers (IANA)


def ipv4_problem(packet):
    """Why `packet` is not a well-formed IPv4 packet, or None if it is."""
    n = len(packet)
    if n < IPV4_HEADER:
        return "short"
    first, length = IPV4_START.unpack_from(packet)
    if first >> 4 != 4:
        return "not-ipv4"
    header = (first & 0x0F) * 4
    if header < IPV4_HEADER:
        return "bad-ihl"      # IHL < 5 is forbidden by RFC 791
    if header > n:
        return "truncated"
    if length != n:
        return "bad-length"   # total length must match the datagram exactly
    return None


def ipv6_problem(packet):
    """Why `packet` is not a well-formed IPv6 packet, or None if it is."""
    if len(packet) < IPV6_HEADER:
        return "short"
    if packet[VERSION] >> 4 != 6:
        return "not-ipv6"
    if BE16.unpack_from(packet, IPV6_LENGTH.start)[0] + IPV6_HEADER != len(packet):
        return "bad-length"   # (a jumbogram, RFC 2675, says 0 here: not over UDP)
    return None


def ip_problem(packet):
    """Why `packet` is neither a well-formed IPv4 nor IPv6 packet, or None.
    The version, the first 4 bits, tells them apart: the one thing our wire
    format (no header of our own) has to go on.

    Nearly every packet is IPv4 without options, and it passes every check
    of ipv4_problem when it is at least a header long, its first byte says
    so and its total length is its size: that is looked at first, in one
    step. (It runs for every packet that comes in, at both ends.)"""
    n = len(packet)
    if n >= IPV4_HEADER:
        first, length = IPV4_START.unpack_from(packet)
        if first == IPV4_NO_OPTIONS and length == n:
            return None
    version = packet[VERSION] >> 4 if packet else 0
    if version == 4:
        return ipv4_problem(packet)
    if version == 6:
        return ipv6_problem(packet)
    return "short" if not packet else "not-ip"


def destination(packet):
    """A well-formed packet's destination address: 4 bytes, or 16."""
    return packet[IPV4_DST] if packet[VERSION] >> 4 == 4 else packet[IPV6_DST]


def internet_checksum(data):
    """RFC 1071: one's complement of the one's-complement sum of 16-bit words.

    That sum, with its end-around carries, is the remainder of the whole of
    `data`, read as one number, divided by 0xFFFF: each word is worth
    2**16 times the next, and 2**16 leaves 1 when divided by 0xFFFF. One
    difference: words that are not all zero never sum to 0 but to 0xFFFF
    (one's complement has two zeros). int.from_bytes and % do this in C."""
    if len(data) % 2:
        data += b"\0"
    number = int.from_bytes(data, "big")
    total = number % 0xFFFF or (0xFFFF if number else 0)
    return ~total & 0xFFFF


# ICMP (RFC 792): an echo request or reply is type (1 byte), code (1),
# checksum (2), identifier (2), sequence number (2), then any data.
ICMP = 1   # the protocol number (IANA)
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMP_ECHO = struct.Struct("!BBHHH")
IPV4_HEADER_FORMAT = struct.Struct("!BBHHHBBH4s4s")   # as laid out above, 20 bytes


def echo_message(kind, ident, seq, payload, pseudo_header=b""):
    """An echo request or reply (ICMP, or ICMPv6 with its pseudo-header,
    below): its checksum covers the message with a checksum of 0."""
    data = ICMP_ECHO.pack(kind, 0, 0, ident, seq) + payload
    return ICMP_ECHO.pack(kind, 0, internet_checksum(pseudo_header + data), ident, seq) + payload


def echo_request(src, dst, ident, seq, payload=b"udptun keepalive"):
    """An ICMP echo request from src to dst, both 4-byte addresses.

    It is our keepalive: a valid IP packet, so a socat peer writes it to its
    TUN device (an empty datagram would end socat's stream), and any peer's
    kernel answers it, so it also tells the client the server is alive.
    """
    icmp = echo_message(ICMP_ECHO_REQUEST, ident, seq, payload)
    ttl = 64
    header = IPV4_HEADER_FORMAT.pack(IPV4_NO_OPTIONS, 0, IPV4_HEADER + len(icmp), 0, 0, ttl, ICMP, 0, src, dst)
    checksum = internet_checksum(header).to_bytes(2, "big")
    return header[:IPV4_CHECKSUM.start] + checksum + header[IPV4_CHECKSUM.stop:] + icmp


# ICMPv6 (RFC 4443) has the same echo messages, as types 128 and 129. Its
# checksum also covers a pseudo-header (RFC 8200, section 8.1): source,
# destination, the message's length (32 bits) and its next header number.
ICMPV6 = 58   # the next header number (IANA)
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
ICMPV6_PSEUDO_HEADER = struct.Struct("!16s16sI3xB")
IPV6_HEADER_FORMAT = struct.Struct("!IHBB16s16s")   # version | class | flow, length, next header, hop limit


def echo_request6(src, dst, ident, seq, payload=b"udptun probe"):
    """An ICMPv6 echo request from src to dst, both 16-byte addresses."""
    pseudo_header = ICMPV6_PSEUDO_HEADER.pack(src, dst, ICMP_ECHO.size + len(payload), ICMPV6)
    icmp = echo_message(ICMPV6_ECHO_REQUEST, ident, seq, payload, pseudo_header)
    hop_limit = 64
    return IPV6_HEADER_FORMAT.pack(6 << 28, len(icmp), ICMPV6, hop_limit, src, dst) + icmp


def is_echo_reply(packet, src, ident):
    """True for the reply to one of our keepalives (well-formed IPv4 packets only)."""
    at = (packet[VERSION] & 0x0F) * 4   # where the ICMP message starts
    if packet[IPV4_PROTOCOL] != ICMP or packet[IPV4_SRC] != src or len(packet) < at + ICMP_ECHO.size:
        return False
    kind, _, _, their_ident, _ = ICMP_ECHO.unpack_from(packet, at)
    return kind == ICMP_ECHO_REPLY and their_ident == ident


def as_text(value):
    """A 4- or 16-byte address, or a socket address (host, port, ...) -> text.
    An IPv4 peer of a dual-stack socket shows as IPv4, not ::ffff:a.b.c.d."""
    if isinstance(value, tuple):
        host = value[0][7:] if value[0].startswith("::ffff:") else value[0]
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return socket.inet_ntop(socket.AF_INET if len(value) == 4 else socket.AF_INET6, value)


# ================ 4. The TUN device and the UDP socket
# The two ends of the pipe: a TUN device, where the kernel hands us the
# packets it routes into the tunnel and takes the ones we give it; and a
# UDP socket, which carries them to the other end.

class Tun:
    """A TUN device: read() gives one IP packet the kernel routed into it,
    write() hands one IP packet to the kernel as if it had arrived on it.

    See the kernel's Documentation/networking/tuntap.rst. The device is not
    persistent: when our file descriptor closes (however the process ends,
    kill -9 included) the kernel deletes it, and its addresses and routes
    with it. That is one undo we never have to write.
    """
    FLAGS = IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL
    vnet = False   # (see VnetTun, in chapter 9)

    def __init__(self, name):
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError(f"no {TUN_PATH}: load the tun module (modprobe tun), or in a "
                            "container pass the device (docker run --device /dev/net/tun "
                            "--cap-add NET_ADMIN)") from None
        except PermissionError:
            raise UserError(f"cannot open {TUN_PATH}: run as root (sudo)") from None
        # struct ifreq (<linux/if.h>): 16-byte name, then a union whose first
        # member here is `short ifr_flags`; 40 bytes in all. IFF_TUN_EXCL: a
        # new device, never one that exists (a persistent one that `ip tuntap
        # add` or `openvpn --mktun` made, which we would otherwise adopt, and
        # whose addresses and routes would outlive us).
        try:
            ifreq = fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), self.FLAGS))
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EBUSY:
                raise UserError(f"a device named {name} exists already (another VPN, or a persistent one "
                                f"from `ip tuntap add`): pick another --dev, or remove it "
                                f"(ip link del {name})") from None
            if e.errno == errno.EPERM:   # creating one needs CAP_NET_ADMIN
                raise UserError("creating a TUN device needs root: run with sudo") from None
            raise UserError(f"cannot create TUN device {name}: {e.strerror}") from None
        self.name = ifreq[:16].rstrip(b"\0").decode()

    def read(self):
        """One packet, or None if there is none."""
        try:
            return os.read(self.fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet):
        os.write(self.fd, packet)

    def close(self):
        os.close(self.fd)


class FakeTun:
    """What --dry-run uses instead: no device, no root needed. (`vnet`: as
    the device the speed layer would open, see VnetTun in chapter 9.)"""

    fd = -1

    def __init__(self, name, vnet=False):
        self.name, self.vnet = name, vnet

    def close(self):
        pass


def open_udp_socket(family=socket.AF_INET):
    """A UDP socket whose datagrams routers may fragment.

    Linux sets Don't Fragment on UDP by default (path-MTU discovery). If a
    link on the way is smaller than our datagrams and a firewall drops the
    ICMP "fragmentation needed" that should tell us (a PMTU black hole,
    RFC 2923), every full-size packet would vanish silently. With DF clear, a
    router fragments the outer datagram instead and the far end reassembles
    it: slower, but it works (RFC 4459 section 3.1, the choice VXLAN and GRE
    make with `nopmtudisc`). On a normal path nothing is fragmented, because
    the tunnel MTU leaves room for the outer headers. IPv6 routers never
    fragment (RFC 8200): over IPv6 the kernel learns the path MTU from ICMPv6
    "packet too big" and fragments at the source, its default.

    An AF_INET6 socket is dual-stack (IPV6_V6ONLY off): it also carries IPv4,
    whose peers it shows as ::ffff:a.b.c.d; IP_MTU_DISCOVER still applies to
    that IPv4 traffic.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
        except PermissionError:   # not root (tests): as much as net.core.*mem_max allows
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return sock


def family_of(sockaddr):
    return socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET


def host_ip(host):
    """The host of a socket address as an ip_address: without its IPv6 scope
    (fe80::1%eth0: Python 3.8 takes none), and as IPv4 if it is an
    IPv4-mapped one (::ffff:192.0.2.1: an IPv4 peer of a dual-stack socket,
    reached over IPv4)."""
    ip = ipaddress.ip_address(host.split("%")[0])
    return getattr(ip, "ipv4_mapped", None) or ip


def listen(port):
    """The server's socket: dual-stack (IPv4 and IPv6 on one socket) where
    the machine has IPv6, else IPv4."""
    try:
        sock = open_udp_socket(socket.AF_INET6)
        host = "::"
    except OSError:   # EAFNOSUPPORT: a kernel without IPv6
        sock, host = open_udp_socket(socket.AF_INET), "0.0.0.0"
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"UDP port {port} is in use (another udptun?): stop it or pick another --port") from None
        raise UserError(f"cannot listen on UDP port {port}: {e.strerror}") from None
    # Only now, once the port is ours: each client's own socket (see
    # socket_for) may share it. A socket of another user, or one bound
    # without SO_REUSEPORT (another udptun), still finds the port in use
    # (the uid check in udp_lib_lport_inuse, net/ipv4/udp.c).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def socket_for(listener, addr):
    """A socket that receives the datagrams of socket address `addr` alone:
    bound to the listener's port too, and connected to `addr`. The kernel
    gives a datagram to the bound socket that matches it best, and a
    connected one matches its peer's address and port besides ours
    (compute_score, net/ipv4/udp.c; net/ipv6/udp.c), so `addr`'s datagrams
    queue in this socket's buffer, apart from everyone else's. (In the
    moment between bind and connect it may take others' datagrams too:
    whoever reads it checks each sender, as on the listener.) Raises
    OSError.

    Its receive buffer is CLIENT_SOCKET_BUFFER (it sends nothing: replies
    leave by the listener, see Server.address_for): a stranger's flood
    waits there, and the kernel's memory for all UDP sockets together is
    limited (net.ipv4.udp_mem)."""
    sock = open_udp_socket(listener.family)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CLIENT_SOCKET_BUFFER)
        except PermissionError:   # (not root: tests)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(listener.getsockname())
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock


def connect_udp(server, mark=None):
    """The client's socket, connected to `server` (a socket address): the
    kernel then passes us only the server's datagrams, and tells us of ICMP
    errors about ours. `mark` is the firewall mark that keeps it out of the
    tunnel."""
    try:
        sock = open_udp_socket(family_of(server))
    except OSError as e:
        raise UserError(f"cannot open a UDP socket: {e.strerror}") from None
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot mark the tunnel's socket (SO_MARK): {e.strerror}: run as root") from None
    try:
        sock.connect(server)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot reach server {as_text(server)}: {e.strerror}: check this machine's network") from None
    return sock


def resolve(name, port, family=socket.AF_UNSPEC):
    """The socket address of server `name`: the first that getaddrinfo()
    gives (RFC 6724's order, as ssh and curl take it), or of `family` only
    (-4, -6). A UserError if there is none."""
    try:
        addr = socket.getaddrinfo(name, port, family, socket.SOCK_DGRAM)[0][4]
    except (socket.gaierror, UnicodeError):
        kind = {socket.AF_INET: "IPv4 ", socket.AF_INET6: "IPv6 "}.get(family, "")
        raise UserError(f"cannot resolve server {name!r} to an {kind}address: check the name, "
                        "or give its address") from None
    # ::ffff:192.0.2.1 is an IPv4 host, reached over IPv4: the way around
    # the tunnel (see Routing.around) must be IPv4's.
    ip = host_ip(addr[0])
    return (str(ip), addr[1]) if ip.version == 4 else addr


# ================ 5. The plain forwarding loop
class Forwarder:
    """The tunnel itself: one packet in, one packet out.

    run() sleeps until the TUN device or a UDP socket has something to
    read, and calls its handler: tun_to_udp() reads one packet the kernel
    routed into the tunnel and sends it as one datagram; udp_to_tun(sock)
    receives one datagram and writes the packet in it to the TUN device, as
    if it had arrived on a network card. That is all a tunnel does. About
    once a second, at a quiet moment, run() calls tick(), for timers, and
    publishes status().

    What may pass is the subclass's business (Server, Client), which fills
    in these hooks:
    - admit(data, addr): may this datagram from socket address `addr` go
      into the TUN device? It counts what it refuses, with drop().
    - address_for(packet): where a packet read from the TUN device goes:
      a socket address, None for the connected peer, or False (dropped,
      and counted with drop()).
    - tick(now), status(); unreachable(error), told when the socket
      reports an error; and watch_more(), for descriptors of its own (the
      client's routing monitor).
    Callers: run(); and, for the subclasses, send_one() (a keepalive, a
    probe), replace_socket() (the client's, when its network changes),
    watch_socket() and forget_socket() (the server's, a socket per client).

    This loop is about as fast as socat (which does the same in C) with
    small packets, and slower with TCP, whose full-size packets each cost
    the kernel a trip through its stack. The speed layer
    (see Batching, "Going faster") mixes into a subclass and overrides the
    methods that do I/O; --plain leaves it out, and the tunnel works the
    same, slower.
    """

    def __init__(self, tun, sock, verbose=False):
        self.tun, self.sock, self.verbose = tun, sock, verbose
        self.now = self.started = time.monotonic()
        self.drops = {}            # reason -> count
        self.log = LogLimit()
        self.status_path = None    # where to publish status() every second, if set
        self.poller = None         # run()'s epoll object, once it runs
        self.handlers = {}         # file descriptor -> the method to call when it is readable
        self.next_tick = 0         # when tick() is due (time.monotonic())

    def drop(self, reason, *detail, count=1):
        """Count dropped packets. Their detail (addresses, a message) is only
        formatted with -v: a flood must not cost a log line's work each."""
        self.drops[reason] = self.drops.get(reason, 0) + count
        if self.verbose:
            self.log("drop", f"drop {reason} " + " ".join(d if isinstance(d, str) else as_text(d) for d in detail),
                     self.now)

    def run(self):
        # epoll, level-triggered: a descriptor is reported while it has
        # something to read. (The selectors module wraps the same call, at a
        # cost we would pay on every wake-up.)
        self.poller = select.epoll()
        self.watch(self.tun.fd, self.tun_to_udp)
        self.watch_socket(self.sock)
        self.watch_more()
        # What exists now lives until we stop: the collector need never
        # look at it again. (A full collection walks every object, and
        # would hold up the packets of its turn by milliseconds.)
        gc.freeze()
        while True:
            # Sleep until something is readable or a tick is due. While
            # packets are queued (see queued()), only look: asleep, we
            # would leave them until the next datagram or tick.
            events = self.poller.poll(0 if self.queued() else max(0.0, self.next_tick - self.now))
            self.now = time.monotonic()
            self.handle(events)
            # The timers' work (a status file, a route lookup) waits for a
            # quiet moment, so a packet never waits for it: until nothing
            # arrived in time, or until it is a second late on a busy tunnel.
            quiet = not events and not self.queued()
            if self.now >= self.next_tick and (quiet or self.now >= self.next_tick + 1.0):
                self.tick(self.now)
                self.publish()
                self.next_tick = self.now + 1.0

    def watch_more(self):
        """Watch a subclass's own descriptors too (the client's routing monitor)."""

    def watch(self, fd, handler, poller=None):
        (poller or self.poller).register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def watch_socket(self, sock, poller=None):
        """Read `sock` whenever it has a datagram (on `poller`, or run()'s:
        the server reads its clients' own sockets on an epoll of their own,
        see Server.read_clients)."""
        self.watch(sock.fileno(), functools.partial(self.udp_to_tun, sock), poller)

    def forget_socket(self, sock, poller=None):
        """Stop reading `sock`, and close it."""
        if self.poller:
            (poller or self.poller).unregister(sock)
            self.handlers.pop(sock.fileno(), None)
        sock.close()

    def queued(self):
        """Whether packets wait to be passed on (only the speed layer queues)."""
        return False

    def handle(self, events):
        for fd, _ in events:
            # (None: closed by an earlier handler of this turn. The number
            # may even be a new socket's already: it only finds nothing to read.)
            handler = self.handlers.get(fd)
            if handler:
                handler()

    def tun_to_udp(self):
        packet = self.tun.read()
        if packet is not None and self.from_tun_ok(packet):
            addr = self.address_for(packet)
            if addr is not False:
                self.send_one(packet, addr)

    def udp_to_tun(self, sock):
        try:
            data, addr = sock.recvfrom(MAX_PACKET, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self.socket_error(e)
            return
        if self.admit(data, addr):
            self.write_one(data)

    def from_tun_ok(self, packet):
        """What the kernel routes into the tunnel is IP; anything else (a
        packet too short to be one) the other end could not route. (Only
        a local root process could write one into the device.)"""
        version = packet[VERSION] >> 4 if len(packet) >= IPV4_HEADER else 0
        if version == 4 or version == 6 and len(packet) >= IPV6_HEADER:
            return True
        self.drop("tun-not-ip")
        return False

    def send_one(self, packet, addr):
        """Send one datagram to `addr` (None: the connected peer)."""
        try:
            if addr is None:
                self.sock.send(packet)
            else:
                self.sock.sendto(packet, addr)
        except OSError as e:
            self.send_failed(e, 1)

    def send_failed(self, error, count):
        """Sending failed (no route now, or an ICMP error reported late):
        count it and keep going, the network may come back."""
        self.drop("send-error", error.strerror, count=count)
        self.unreachable(error)

    def socket_error(self, error):
        """A connected UDP socket reports an ICMP error about an earlier
        datagram on its next call, as an errno: port unreachable is
        ECONNREFUSED, "administratively prohibited" EHOSTUNREACH, a
        parameter problem EPROTO, and so on (__udp4_lib_err in
        net/ipv4/udp.c, with the icmp_err_convert table of net/ipv4/icmp.c;
        over IPv6, icmpv6_err_convert in net/ipv6/icmp.c). The kernel
        forgets it once reported. It says the peer cannot be reached now,
        never that we should stop."""
        self.drop("icmp-error", error.strerror)
        self.unreachable(error)

    def write_one(self, packet):
        try:
            self.tun.write(packet)
        except OSError as e:
            self.drop("tun-write", e.strerror)   # count, never crash

    def replace_socket(self, sock):
        """Go on with `sock` instead of the socket in use (which is closed)."""
        self.forget_socket(self.sock)
        self.sock = sock
        if self.poller:
            self.watch_socket(sock)

    # Hooks for the subclasses (see the class's docstring).
    def admit(self, data, addr):
        return True

    def address_for(self, packet):
        return None

    def tick(self, now):
        pass

    def status(self):
        return {}

    def unreachable(self, error):
        """The socket reported `error` (an OSError, already counted): the
        peer cannot be reached for now. The client says so."""

    def publish(self):
        """Write status() to a file anyone may read: `udptun.py status`
        needs no privileges, and a crashed run leaves nothing listening."""
        if self.status_path:
            status = dict(self.status(), pid=os.getpid(), device=self.tun.name, time=time.time(),
                          drops=dict(sorted(self.drops.items())))
            tmp = self.status_path + ".tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(status, f)
                os.replace(tmp, self.status_path)
            except BaseException as e:
                # A signal (Stop) or a full /run midway: leave no stray file,
                # or the folder it is in could never be removed.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                if not isinstance(e, OSError):
                    raise
                self.log("status", f"udptun: warning: cannot write {self.status_path}: {e.strerror}", self.now)


# ================ 6. The server's policy: who owns a tunnel address, what may pass
# Anyone can send the server a datagram: there is no key. So it trusts an
# outer address (and port) only for the tunnel address it claimed first,
# and lets a packet through only from the address that owns its source.
class Peer:
    """One client of the server: the UDP address that owns a tunnel IP."""

    __slots__ = ("ip", "addr", "last_seen", "since", "previous", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                 "last_dst")

    def __init__(self, ip, addr, now):
        self.ip, self.addr, self.last_seen, self.since = ip, addr, now, now
        self.previous = None   # the address it moved from, if that one had held it long
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.last_dst = None   # the destination of its last packet let in (see Server.admit)


def host_of(addr):
    """Who sends from socket address `addr`, for --max-per-host: its IP, or
    for IPv6 its /64 (one home or one VPS has a whole /64 to send from)."""
    host = addr[0]
    if ":" not in host or host.startswith("::ffff:"):
        return host
    return ipaddress.IPv6Address(host.split("%")[0]).packed[:8]


class ClientTable:
    """Which UDP address owns each tunnel IP. Lookups are one dict access.

    The rules, in order, for a packet from UDP address `addr` whose inner
    source is tunnel IP `ip`:
    - owner is `addr`: the packet is theirs (the fast path).
    - nobody owns `ip` (or the owner expired): first claim wins, while the
      table has room and `addr`'s IP holds fewer than `max_per_host`
      addresses (so one host cannot take the subnet).
    - same outer IP (for IPv6, the same /64: a laptop's temporary address
      changes every day, RFC 8981), new port: a NAT rebinding, or a new
      address of the same machine. The binding moves once the
      owner's port has been quiet for REBIND_QUIET: a NAT gives a new port
      to a flow that went idle, or to a laptop that changed networks, never
      to one that is busy. And it moves back at once if the port it left
      speaks again, if that one had held it for REBIND_QUIET too: a NAT's
      old port never speaks again, so the new one was a forger who can send
      as the client's IP. The server asks the old port at once (see
      Server.probe), and a forger, who held the binding only until the
      answer came, is not trusted so.
    - another outer IP: refused and counted, until the owner has been silent
      for `rebind_after` seconds; then it moves (a client whose home address
      changed comes back).
    Bindings idle for `timeout` seconds expire. Every log line goes through
    a LogLimit: a flood of claims writes a few lines, not one each.
    """

    def __init__(self, timeout=DEFAULT_CLIENT_TIMEOUT, rebind_after=DEFAULT_REBIND_AFTER,
                 max_clients=1000, max_per_host=DEFAULT_MAX_PER_HOST):
        self.by_ip = {}
        self.per_host = {}   # outer IP -> how many tunnel addresses it holds
        self.timeout, self.rebind_after = timeout, rebind_after
        self.max_clients, self.max_per_host = max_clients, max_per_host
        self.log = LogLimit()

    def claim(self, ip, addr, now):
        """(the Peer that may send as `ip` from `addr`, None or "moved"), or
        (None, why not)."""
        peer = self.by_ip.get(ip)
        if peer is not None and peer.addr == addr:
            peer.last_seen = now
            return peer, None
        host = host_of(addr)
        if peer is None:
            if len(self.by_ip) >= self.max_clients:
                return None, "table-full"
            if self.per_host.get(host, 0) >= self.max_per_host:
                return None, "host-limit"
            peer = self.by_ip[ip] = Peer(ip, addr, now)
            self.per_host[host] = self.per_host.get(host, 0) + 1
            self.log("join", f"client {as_text(ip)} joined from {as_text(addr)}", now)
            return peer, None
        quiet = now - peer.last_seen
        if host == host_of(peer.addr) and (quiet >= REBIND_QUIET or addr == peer.previous) or quiet >= self.rebind_after:
            if host != host_of(peer.addr):
                if self.per_host.get(host, 0) >= self.max_per_host:
                    return None, "host-limit"
                self.forget(host_of(peer.addr))
                self.per_host[host] = self.per_host.get(host, 0) + 1
            self.log("move", f"client {as_text(ip)} moved from {as_text(peer.addr)} to {as_text(addr)}", now)
            peer.previous = peer.addr if now - peer.since >= REBIND_QUIET else None
            peer.addr, peer.last_seen, peer.since = addr, now, now
            return peer, "moved"
        self.log("refuse", f"client {as_text(ip)}: refused claim from {as_text(addr)} "
                           f"(owned by {as_text(peer.addr)})", now)
        return None, "refused"

    def forget(self, host):
        left = self.per_host.pop(host) - 1
        if left:
            self.per_host[host] = left

    def expire(self, now):
        """Forget the bindings idle for `timeout`: a list of their Peers."""
        gone = [p for p in self.by_ip.values() if now - p.last_seen >= self.timeout]
        for peer in gone:
            del self.by_ip[peer.ip]
            self.forget(host_of(peer.addr))
            self.log("expire", f"client {as_text(peer.ip)} expired (silent since {now - peer.last_seen:.0f} s)", now)
        return gone


class OwnSockets:
    """A socket of its own for each client's UDP address (see socket_for),
    so that the kernel queues each client's datagrams apart.

    Why: on one shared socket, a stranger who sends faster than we read
    fills its receive buffer, and the kernel then drops a client's
    datagrams with the stranger's, before we get to be fair to anyone (a
    download through such a flood fell to nothing). With a socket each, a
    flood overflows its own buffer, and the loop reads each ready socket in
    turn. The listening socket hears newcomers, and those who own nothing.

    A client may own its IPv4 and its IPv6 tunnel address from one UDP
    address: the socket lives while that address owns any. Opening one
    can fail (too many open files): that client's datagrams then come on
    the listening socket, as everyone's did before.
    """

    def __init__(self, listener):
        self.listener = listener
        # Open files to spare (for the pipes of the commands that undo our
        # changes, say): past that, clients share the listening socket.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.most = None if soft == resource.RLIM_INFINITY else soft - 64
        self.held = {}    # UDP address -> [its socket or None, the tunnel addresses it owns]
        self.owned = {}   # a socket's file descriptor -> the tunnel addresses its peer owns
        self.log = LogLimit()

    def __len__(self):
        return len(self.owned)

    def add(self, addr, ip, now):
        """`addr` owns tunnel address `ip` too: its new socket, if it needs one."""
        held = self.held.get(addr)
        if held:
            held[1].add(ip)
            return None
        try:
            if self.most is not None and len(self.owned) >= self.most:
                raise OSError(errno.EMFILE, "no more open files to spare")
            sock = socket_for(self.listener, addr)
        except OSError as e:
            self.log("socket", f"udptun: warning: no socket of its own for {as_text(addr)}: {e.strerror}", now)
            sock = None
        held = self.held[addr] = [sock, {ip}]
        if sock:
            self.owned[sock.fileno()] = held[1]
        return sock

    def remove(self, addr, ip):
        """`addr` no longer owns `ip`: its socket, to close, if that was its last."""
        held = self.held.get(addr)
        if not held:
            return None
        held[1].discard(ip)
        if held[1]:
            return None
        del self.held[addr]
        if held[0]:
            del self.owned[held[0].fileno()]
        return held[0]


class Server(Forwarder):
    """The server's policy: many clients, one UDP socket to hear them and
    one each to read them (see OwnSockets), one TUN device.

    A datagram goes into the TUN device if it holds a well-formed IP packet
    whose source is a tunnel address its sender owns (see ClientTable) and,
    unless --client-to-client, whose destination is not another client's.
    A packet from the TUN device goes to the client that owns its
    destination. `addresses` are the server's tunnel addresses
    (IPv4Interface, and IPv6Interface when IPv6 is on): each gives a subnet
    from which clients take theirs.
    """

    def __init__(self, tun, sock, addresses, table, client_to_client=False, allow=None, local=(), verbose=False):
        super().__init__(tun, sock, verbose)
        self.local = set(local)   # this machine's addresses
        self.table = table
        self.client_to_client = client_to_client
        self.subnets = {}    # address length (4 or 16) -> (network, netmask) as integers
        self.own = set()     # the server's own tunnel addresses
        self.reserved = set()
        for a in addresses:
            net = a.network
            self.subnets[len(a.ip.packed)] = (int(net.network_address), int(net.netmask))
            self.own.add(a.ip.packed)
            # A client may not claim the server's address, nor the subnet's
            # first (IPv4's network address, IPv6's subnet-router anycast,
            # RFC 4291) or last (IPv4's broadcast) address.
            self.reserved |= {a.ip.packed, net.network_address.packed, net.broadcast_address.packed}
        self.allow = allow   # --allow: outer networks that may use us, or None: anyone
        self.ip4 = next((a.ip.packed for a in addresses if a.version == 4), None)   # for probes
        self.ip6 = next((a.ip.packed for a in addresses if a.version == 6), None)
        self.seq = 0
        self.last_host = self.last_verdict = None   # claim()'s outer host, and whether it is (allowed, looped)
        self.last_refusal = (None, None, None, None)   # (source, address, turn, why): claim()'s last refusal
        self.own_sockets = OwnSockets(sock)
        self.clients = None      # the epoll object of the clients' own sockets, once there is one
        self.crowded = False     # whether read_clients() left ready sockets for the next turn

    def admit(self, data, addr):
        """The checks, cheapest and most common first: a well-formed packet
        from the address that owns its source, going where the one before
        it went, is a dict lookup and a comparison away from passing."""
        problem = ip_problem(data)
        if data and data[VERSION] >> 4 == 4:   # (written out: this runs for every packet)
            src, dst = data[IPV4_SRC], data[IPV4_DST]
        else:
            src, dst = data[IPV6_SRC], data[IPV6_DST]
        peer = None if problem else self.table.by_ip.get(src)
        if peer is not None and peer.addr == addr:
            peer.last_seen = self.now
        else:
            peer = self.claim(data, addr, problem, src)
            if peer is None:
                return False
        # Whether a destination may be reached depends on it alone (and on
        # options fixed at the start), and a client's packets mostly go where
        # its last one went: looked at again only when it changes. (Never on
        # who sends: what a Peer remembers holds when its owner moves.)
        if dst != peer.last_dst:
            if not self.client_to_client and dst not in self.own and self.in_subnet(dst):
                self.drop("client-to-client", src, "->", dst)
                return False
            peer.last_dst = dst
        peer.rx_packets += 1
        peer.rx_bytes += len(data)
        return True

    def claim(self, data, addr, problem, src):
        """The rest of admit(), for a datagram whose sender does not own its
        source (yet): the Peer that may send it, or None (counted)."""
        # What the outer address is: parsed once for a run of datagrams from
        # one host (ipaddress takes microseconds, and a flood comes in runs).
        host = addr[0]
        if host != self.last_host:
            allowed = self.allow is None or self.allowed(host)
            self.last_host, self.last_verdict = host, (allowed, allowed and self.looped(host))
        allowed, looped = self.last_verdict
        if not allowed:
            self.drop("not-allowed", addr)   # whatever is inside
            return None
        if problem:
            self.drop("empty" if not data else problem, addr)   # (empty: a socat peer's end of stream)
            return None
        if self.last_refusal[:3] == (src, addr, self.now):   # the same sender's run, in this turn
            self.drop(self.last_refusal[3], src, "from", addr)
            return None
        if looped:
            why = "loop"
        elif src in self.reserved or not self.in_subnet(src):
            why = "bad-source"
        else:
            owner = self.table.by_ip.get(src)
            was = owner and owner.addr
            peer, why = self.table.claim(src, addr, self.now)
            if peer is not None:
                if was != addr:
                    self.moved(src, was, addr)
                if why == "moved" and peer.previous:
                    self.probe(peer)
                return peer
        self.last_refusal = (src, addr, self.now, why)
        self.drop(why, src, "from", addr)
        return None

    def in_subnet(self, ip):
        net, mask = self.subnets.get(len(ip), (-1, 0))
        return int.from_bytes(ip, "big") & mask == net

    def looped(self, host):
        """Whether a datagram's outer source cannot be a client's: loopback,
        multicast, unspecified, one of this machine's own addresses, or
        inside the tunnel. The last is a packet we wrote to the TUN device
        that came back to our own port (a client's packet to 10.0.0.2:5555):
        so it is never parsed as a tunnel datagram, and cannot loop."""
        ip = host_ip(host)
        return (ip.is_loopback or ip.is_multicast or ip.is_unspecified or str(ip) in self.local
                or self.in_subnet(ip.packed))

    def allowed(self, host):
        ip = host_ip(host)
        return any(ip in net for net in self.allow)

    def probe(self, peer):
        """Ask the address a binding just left whether it is still there: an
        echo request (ICMP or ICMPv6) to the client's tunnel address. A live
        client's kernel answers through the tunnel, from that address, and
        takes its binding back (see ClientTable.claim) before a second
        forged move could leave it neither owner nor previous owner; one
        that really moved never answers."""
        self.seq = (self.seq + 1) & 0xFFFF
        if len(peer.ip) == 4 and self.ip4:
            self.send_one(echo_request(self.ip4, peer.ip, 0x5555, self.seq), peer.previous)
        elif len(peer.ip) == 16 and self.ip6:
            self.send_one(echo_request6(self.ip6, peer.ip, 0x5555, self.seq), peer.previous)

    def address_for(self, packet):
        """The owner of the packet's destination."""
        dst = destination(packet)
        peer = self.table.by_ip.get(dst)
        if peer is None:
            self.drop("no-client", dst)
            return False
        peer.tx_packets += 1
        peer.tx_bytes += len(packet)
        return peer.addr

    def moved(self, ip, old, new):
        """Tunnel address `ip`'s owner is now UDP address `new` (None:
        nobody), and was `old` (None: nobody): each one's own socket follows."""
        if not self.poller:   # (not forwarding: a test's)
            return
        if self.clients is None:
            self.clients = select.epoll()
            self.watch(self.clients.fileno(), self.read_clients)
        if old:
            sock = self.own_sockets.remove(old, ip)
            if sock:
                self.forget_socket(sock, self.clients)
        if new:
            sock = self.own_sockets.add(new, ip, self.now)
            if sock:
                self.watch_socket(sock, self.clients)

    def read_clients(self):
        """Read at most MAX_EVENTS of the clients' own sockets that are ready:
        a turn's work does not grow with the number of busy senders, and the
        TUN device and the listening socket (on run()'s epoll, where this one
        is a descriptor too) are served at every turn. epoll hands out the
        rest at the next turns: it puts those it reported at the back of its
        ready list (ep_send_events, fs/eventpoll.c), so each takes its turn."""
        events = self.clients.poll(0, MAX_EVENTS)
        self.crowded = len(events) == MAX_EVENTS
        for fd, _ in events:
            handler = self.handlers.get(fd)
            if handler:
                handler()

    def tick(self, now):
        for peer in self.table.expire(now):
            self.moved(peer.ip, peer.addr, None)

    def status(self):
        return {"role": "server", "sockets": len(self.own_sockets), "clients": [
            {"ip": as_text(p.ip), "udp": as_text(p.addr), "idle": round(self.now - p.last_seen, 1),
             "rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes,
             "tx_packets": p.tx_packets, "tx_bytes": p.tx_bytes}
            for p in self.table.by_ip.values()]}


def local_addresses(system):
    """The machine's own addresses, as text: a datagram claiming to come
    from one of them is a loop, or a forgery (see Server.looped)."""
    return {line.split()[3].split("/")[0] for line in system.query("ip", "-o", "address", "show").splitlines()
            if len(line.split()) > 3}


# ================ 7. The client: a laptop's life
# The client sends everything into the tunnel, except the tunnel's own
# datagrams, which must go out the way they always did: policy routing, as
# wg-quick does it (see Routing, in chapter 8). And a laptop sleeps, changes
# networks, and loses its server for a while, and other programs change its
# routing; the client follows.
class Client(Forwarder):
    """One server, one connected UDP socket, keepalives and liveness logs,
    and a laptop's life: its network changes, and the server's address may
    change too.

    `server` is its (address, port); `name` the host name the user gave, if
    any, looked up again while the server is not answering; `mark` the
    firewall mark of the socket (see Routing).
    """

    def __init__(self, tun, sock, addresses, server_tunnel_ip, keepalive, mark, name=None, family=socket.AF_UNSPEC,
                 verbose=False):
        super().__init__(tun, sock, verbose)
        self.addresses = addresses            # (a new address of the server's may not be inside them)
        self.my_ip = addresses[0].ip.packed   # where keepalives come from
        self.mine = {a.ip.packed for a in addresses}   # what we let in
        self.server_ip = server_tunnel_ip.packed
        self.server = sock.getpeername()
        self.name, self.mark, self.family = name, mark, family   # family: -4, -6, or either
        self.keepalive = keepalive
        self.ident = os.getpid() & 0xFFFF
        self.seq = 0
        self.last_tx = self.last_rx = self.last_keepalive = self.last_lookup = float("-inf")
        self.alive = None   # unknown until the first reply or timeout
        self.lookup = None               # the lookup thread, while one runs
        self.answers = queue.SimpleQueue()   # what lookups found: (round, address or None)
        self.round = 0                   # answers from an earlier outage are stale
        self.tx_packets = self.rx_packets = self.tx_bytes = self.rx_bytes = 0
        self.moved = None   # called with the server's new address, when its name has one (see Routing.around)
        self.routing = None           # the Routing to keep in place, if any
        self.resolv_conf = None       # the ResolvConf to keep ours, if any
        self.monitor = None           # and the socket that tells of changes to routing (see routing_monitor)
        self.routing_changed = True   # since the last tick (at first: since setup)

    def address_for(self, packet):
        """Everything goes to the server, on the connected socket."""
        self.tx_packets += 1
        self.tx_bytes += len(packet)
        self.last_tx = self.now
        return None

    def admit(self, data, addr):
        """Only packets for our own tunnel address go on. The kernel lets in
        only datagrams from the server's address and port, but anyone who
        can send as that address could otherwise reach this laptop's other
        addresses (its LAN side), other hosts or a broadcast through us."""
        problem = ip_problem(data)
        if problem:
            self.drop(problem)
            return False
        dst = destination(data)
        if dst not in self.mine:
            self.drop("not-for-us", dst)
            return False
        self.rx_packets += 1
        self.rx_bytes += len(data)
        self.last_rx = self.now
        if self.alive is not True:
            self.alive = True
            self.round += 1
            log("server is answering")
        # The answer to our keepalive is ours, not the kernel's.
        return not (len(dst) == 4 and data[IPV4_PROTOCOL] == ICMP and is_echo_reply(data, self.server_ip, self.ident))

    def unreachable(self, error):
        """An ICMP error, or a send that failed. Anyone on the path can forge
        the first, so it counts only when the server has been quiet for a
        while: then a flood of forged errors logs a line at most per
        keepalive, and never hides a server that answers."""
        if self.alive is not False and self.now - self.last_rx >= 0.5:
            self.alive = False
            log(f"server is not answering ({error.strerror}): still trying")

    def send_keepalive(self):
        self.seq = (self.seq + 1) & 0xFFFF
        self.send_one(echo_request(self.my_ip, self.server_ip, self.ident, self.seq), None)
        self.last_keepalive = self.now

    def watch_more(self):
        if self.routing:
            try:
                self.monitor = routing_monitor()
            except OSError as e:   # (a sandbox without netlink: the kill switch alone, then)
                log(f"udptun: warning: cannot watch the routing ({e.strerror}): deleted rules stay deleted")
                return
            self.watch(self.monitor.fileno(), self.hear_of_routing)

    def hear_of_routing(self):
        """Routes or rules changed: read the news, and look at the next tick
        (a network change brings many at once)."""
        while True:
            try:
                self.monitor.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:   # ENOBUFS: more news than the socket held; the rest is still to read
                if e.errno != errno.ENOBUFS:
                    break
        self.routing_changed = True

    def tick(self, now):
        if self.routing_changed and self.routing:
            self.routing_changed = False
            self.routing.repair()
        if self.resolv_conf:
            self.resolv_conf.keep()
        self.follow_network()
        k = self.keepalive
        if k:
            quiet = now - self.last_tx >= k or now - self.last_rx >= k
            if quiet and now - self.last_keepalive >= k:
                self.send_keepalive()
            # Three keepalives unanswered: say so once; admit() says when it is back.
            if self.alive is not False and now - self.last_rx >= 3 * k and now - self.started >= 3 * k:
                self.alive = False
                log(f"server is not answering (nothing for {3 * k:g} s): still trying")
        if self.name and self.alive is False:
            self.look_up_again(now, 3 * k if k else 30)

    def follow_network(self):
        """Start over on a new socket when the laptop's address changes.

        A connected UDP socket keeps the source address the kernel chose
        at connect(). After a move to another network that address is gone,
        and every send fails. So once a second we ask which source the
        kernel would choose now, and if it changed, we reconnect. The routes
        need nothing: policy routing already sends our datagrams by whatever
        default route the laptop has now (see Routing).
        """
        source = source_for(self.server, self.mark)
        if source and source != self.sock.getsockname()[0]:
            log(f"the network changed: reaching the server from {source} now")
            self.reconnect(self.server)

    def reconnect(self, server):
        """Swap in a socket connected to `server` from the current source,
        and say hello at once, so the server learns our new outer address."""
        try:
            sock = connect_udp(server, self.mark)
        except UserError as e:
            log(f"udptun: {e}")
            return
        self.replace_socket(sock)
        self.server = server
        if self.keepalive:
            self.send_keepalive()

    def look_up_again(self, now, every):
        """The server was given by name and does not answer: its address may
        have changed (a VPS behind dynamic DNS). Look the name up again, every
        `every` seconds, in a thread: a lookup can take seconds, and packets
        must keep moving meanwhile. One lookup at a time; the answer comes
        back through a queue, the one safe way to hand it over."""
        while not self.answers.empty():
            round, address = self.answers.get()
            if round == self.round and address and address != self.server:
                log(f"server {self.name} is at {as_text(address)} now")
                self.reconnect(address)
                if self.moved and self.server == address:   # (reconnect may have failed: no route there)
                    self.moved(address[0])
        if now - self.last_lookup < every or self.lookup and self.lookup.is_alive():
            return
        self.last_lookup = now

        def lookup(name=self.name, port=self.server[1], family=self.family, round=self.round):
            try:
                address = resolve(name, port, family)
                check_server(address[0], self.addresses)   # (as at the start)
                self.answers.put((round, address))
            except UserError:
                self.answers.put((round, None))
        self.lookup = threading.Thread(target=lookup, daemon=True)
        self.lookup.start()

    def status(self):
        return {"role": "client", "clients": [
            {"ip": as_text(self.server_ip), "udp": as_text(self.server),
             "idle": round(self.now - self.last_rx, 1) if self.rx_packets else None,   # None: never heard
             "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
             "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes, "answering": self.alive}]}


# <linux/rtnetlink.h>: the multicast groups (enum rtnetlink_groups) that
# hear of each change to IPv4's and IPv6's routes and rules. bind() takes
# them as a mask: bit N-1 for group N.
RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE = 7, 8, 11, 19


def routing_monitor():
    """A socket that is readable when a route or a routing rule changed
    (rtnetlink(7)), as `ip monitor route rule` hears. What changed we
    need not read: Routing.repair() tries everything again."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    groups = (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE)
    sock.bind((0, sum(1 << (g - 1) for g in groups)))
    return sock


def source_for(server, mark):
    """The address the kernel would send from to `server` now, or None with
    no route. A UDP connect() sends nothing: it only looks up the route."""
    try:
        with socket.socket(family_of(server), socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            probe.connect(server)
            return probe.getsockname()[0]
    except OSError:
        return None


def strict_reverse_path_filters():
    """Interfaces whose reverse-path filter is strict (rp_filter 1: the
    larger of `all` and the interface's own counts). A strict filter drops
    the server's replies: looking up the way back to the server, unmarked,
    it finds the tunnel, not the interface they came in on."""
    try:
        every = int(sysctl_value("net.ipv4.conf.all.rp_filter"))
        names = [n for n in os.listdir("/proc/sys/net/ipv4/conf") if n not in ("all", "default", "lo")]
        return [n for n in names if max(every, int(sysctl_value(f"net/ipv4/conf/{n}/rp_filter"))) == 1]
    except (OSError, ValueError):
        return []


# ================ 8. System changes and their undo
# Everything udptun changes outside itself, each change paired with its
# undo: the TUN device's addresses, sysctls, the server's firewall and NAT,
# the client's routing, kill switch and resolver; and the journal of undos,
# with the recovery from what a killed run left behind.
def setup_tun(changes, system, args, addresses):
    """Create the TUN device, give it its addresses and bring it up. They
    belong to the device, so the kernel removes them when it closes: no undo.

    The IPv6 address needs no duplicate address detection (`nodad`: no other
    host shares the device), and the device no link-local address
    (`addrgenmode none`): it would only send router solicitations and
    multicast reports to the other end, which has no use for them.

    txqueuelen is the length of the ring where the kernel leaves packets for
    us to read(), a FIFO out of reach of qdiscs such as fq_codel (the
    device drops what does not fit; it never pushes back). It only has to
    hold what arrives in one turn of the loop: the backlog of a busy
    tunnel waits in our FairQueue instead. 1000, as WireGuard's, rides out
    a few milliseconds when the scheduler runs something else.
    """
    vnet = not args.plain   # the speed layer writes merged packets behind a virtio_net_hdr
    tun = FakeTun(args.dev, vnet) if system.dry_run else (VnetTun if vnet else Tun)(args.dev)
    log(f"[#] open {TUN_PATH} as {tun.name} (TUNSETIFF, IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL"
        f"{' | IFF_VNET_HDR' if vnet else ''})")
    changes.defer(tun.close, f"close {tun.name}: the kernel deletes it with its address and routes")
    for address in addresses:
        if address.version == 4:
            changes.make(["ip", "address", "add", str(address), "dev", tun.name])
        else:
            changes.make(["ip", "-6", "address", "add", str(address), "dev", tun.name, "nodad"])
            changes.make(["ip", "link", "set", "dev", tun.name, "addrgenmode", "none"])
    changes.make(["ip", "link", "set", "dev", tun.name, "mtu", str(args.mtu),
                  "txqueuelen", str(args.txqueuelen), "up"])
    return tun


def tag(dev):
    """The comment on every firewall rule we add: how a later run finds them."""
    return f"udptun:{dev}"


def default_interface(system, version=4):
    """The interface of the default route: where the server's NAT goes out.
    None if there is no IPv6 default route (a VPS without IPv6)."""
    for line in system.query("ip", f"-{version}", "route", "show", "default").splitlines():
        words = line.split()
        if "dev" in words:
            return words[words.index("dev") + 1]
    if version == 6:
        return None
    raise UserError("no IPv4 default route: say which interface reaches the internet with --out-interface")


def kernel_has_ipv6():
    """Whether the kernel has IPv6 at all (not booted with ipv6.disable=1)."""
    return os.path.isdir("/proc/sys/net/ipv6")


def ipv6_available():
    """Whether a new device gets IPv6: not where the kernel has none
    (ipv6.disable=1) or where it is turned off (disable_ipv6)."""
    try:
        return sysctl_value("net.ipv6.conf.default.disable_ipv6") == "0"
    except OSError:
        return False


def check_subnet_free(system, network, dev):
    """Refuse a tunnel subnet that overlaps a route or an address the machine
    already has: both would claim the same addresses and one would stop working.
    (Catch-all routes of /0 or /1, another VPN's, do not count.)"""
    v = f"-{network.version}"
    routes = [(line.split()[0], line)
              for line in system.query("ip", v, "-o", "route", "show", "table", "main").splitlines()]
    addresses = [(line.split()[3], line) for line in system.query("ip", v, "-o", "address", "show").splitlines()
                 if len(line.split()) > 3 and line.split()[1] != dev]
    for prefix, line in routes + addresses:
        if prefix == "default" or f"dev {dev} " in line + " ":
            continue
        try:
            existing = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            continue
        if existing.prefixlen > 1 and existing.overlaps(network):
            option = "--address" if network.version == 4 else "--address6"
            raise UserError(f"the tunnel subnet {network} overlaps '{' '.join(line.split()[:6])}' "
                            f"on this machine: pick another {option}, like "
                            + ("10.99.0.1/24" if network.version == 4 else "fd00:99::1/64"))


def sysctl_path(key):
    """net.ipv4.ip_forward is /proc/sys/net/ipv4/ip_forward. (A key naming
    an interface with a dot in its name, eth0.100, is given with slashes,
    as sysctl(8) also takes it.)"""
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


def sysctl_version(key):
    """The IP version a sysctl is about: 6 for net.ipv6's, else 4."""
    return 6 if key.startswith(("net.ipv6", "net/ipv6")) else 4


def sysctl_value(key):
    """A sysctl's value now."""
    with open(sysctl_path(key)) as f:
        return f.read().strip()


def set_sysctl(changes, key, value, unless=()):
    """Set a sysctl, only if it differs (as wg-quick does), and restore the
    value found, not a default; `unless` (a tag) makes the undo leave it
    if firewall rules came since (see System): the undo carries those
    there now."""
    found = sysctl_value(key)
    if found != value:
        before = (forwarding_for_others(changes.system, sysctl_version(key), unless[0])
                  if unless and not changes.system.dry_run else [])   # (a dry run looks at no firewall)
        changes.make(["sysctl", "-w", f"{key}={value}"], undo=["sysctl", "-w", f"{key}={found}", *unless, *before])


# What nft shows of a rule that changes as packets pass: a counter's
# figures, a quota's use, when it last matched (nft(8): STATEFUL OBJECTS).
NFT_FIGURES = re.compile(r" (?:packets \d+ bytes \d+|used \d+ \w+|last used \S+)")
# Where a rule jumps: iptables' -j or -g CHAIN, nft's jump or goto CHAIN
# (in a verdict map too), and nft's named maps (@MAP), whose elements can jump.
JUMP = re.compile(r"(?:^|\s)(?:-[jg]|jump|goto) ([^\s,}]+)|@([\w.-]+)")


def forwarding_for_others(system, version, ours):
    """The firewall rules of IP `version` that may forward or NAT for some
    other program than the run tagged `ours`: Docker's, libvirt's, another
    VPN's (another udptun's too), a host firewall's (ufw, firewalld). Those
    found when forwarding goes on are compared with those found when it
    would go off again (see System): any new one keeps it on.

    Which of them need forwarding nobody can tell, so every rule that sees
    forwarded or NATed packets counts: in iptables, the rules of filter's
    FORWARD and nat's PREROUTING and POSTROUTING, and of every chain they
    jump to, however deep (a host firewall's `route allow` lands in a chain
    of its own); in nft, the same from every chain on the forward hook or
    the nat hooks of routing, in the tables of ours' family or inet but
    ours, through named maps (a Docker network adds an element to one),
    without their changing figures (NFT_FIGURES). Not the chains that only
    INPUT reaches: a ban tool (fail2ban, sshguard) adds a rule there per
    ban."""
    o = re.escape(ours)   # (ours as its comment, in iptables -S or nft: iptables-nft shows ours in nft too)
    tagged = re.compile(rf'(?:--comment (?:"{o}"|{o})|(?:^|\s)comment "{o}")(?:\s|$)').search
    found = []
    if shutil.which(IPTABLES[version]):
        found += iptables_forwarding(system, version, tagged)
    if shutil.which("nft"):
        found += nft_forwarding(system, version, nft_table(ours.split(":", 1)[1]), tagged)
    return found


def iptables_forwarding(system, version, tagged):
    """forwarding_for_others() in iptables: the rules of FORWARD and nat's
    routing hooks, and of the chains they jump to, but those `tagged`."""
    found = []
    for table, roots in (("filter", ["FORWARD"]), ("nat", ["PREROUTING", "POSTROUTING"])):
        chains = {}   # chain -> its rules
        for line in system.query(IPTABLES[version], "-w", "-t", table, "-S", check=False).splitlines():
            if line.startswith("-A ") and not tagged(line):
                chains.setdefault(line.split()[1], []).append(line)
        found += reached(chains, roots)
    return found


def nft_forwarding(system, version, mine, tagged):
    """forwarding_for_others() in nft: the rules reached from the chains on
    the forward hook or a routing nat hook, in the tables of `version`'s
    family or inet but `mine`, but those `tagged`. `nft list ruleset` is
    read by its braces: a table holds chains, maps and other objects (sets,
    flowtables...); a chain holds rules, and a rule may open an anonymous
    chain, whose closing brace may carry the rest of the rule."""
    chains, roots = {}, []   # (table, chain or @map) -> its rules or elements; the chains on those hooks
    table = chain = None
    blocks = []   # what each open brace opened: table, chain, map, object, or rule (an anonymous chain)
    for line in system.query("nft", "list", "ruleset", check=False).splitlines():
        code = re.sub(r"\s#\s.*$", "", line).strip()   # (a table's "# progname firewalld")
        if blocks[-1:] in (["map"], ["object"]):   # (elements may span lines: only a lone } ends them)
            if code == "}":
                blocks.pop()
            elif blocks[-1] == "map" and chain in chains and not code.startswith(("type ", "flags ")):
                chains[chain].append(NFT_FIGURES.sub("", code))
            continue
        if code.endswith("{"):
            words = code.split()
            if not blocks and words[0] == "table":
                kind, table = "table", tuple(words[1:3])
            elif blocks == ["table"] and words[0] in ("chain", "map"):
                kind, chain = words[0], (table, words[1] if words[0] == "chain" else "@" + words[1])
                if table[0] in (NFT_FAMILY[version], "inet") and table[1] != mine:
                    chains[chain] = []
            else:
                kind = "rule" if blocks[-1:] in (["chain"], ["rule"]) else "object"
            blocks.append(kind)
            if kind != "rule":
                continue
        elif code.startswith("}"):
            if (blocks.pop() if blocks else None) != "rule" or code == "}":
                continue
        if blocks[-1:] not in (["chain"], ["rule"]) or chain not in chains:
            continue
        if code.startswith("type "):
            routed_nat = code.startswith("type nat") and re.search(r" hook (pre|post)routing", code)
            if " hook forward" in code or routed_nat:
                roots.append(chain)
        elif code and not code.startswith(("policy ", "comment ", "devices ")) and not tagged(code):
            chains[chain].append(NFT_FIGURES.sub("", code))
    return reached(chains, roots, lambda chain, name: (chain[0], name))   # (a jump stays in its table)


def reached(chains, roots, name_of=lambda chain, name: name):
    """The rules of `chains` ({chain: its rules}) in the `roots` and in
    every chain that a rule of one reached jumps to (JUMP)."""
    found, seen, todo = [], set(), list(roots)
    while todo:
        chain = todo.pop()
        if chain in seen or chain not in chains:
            continue
        seen.add(chain)
        for rule in chains[chain]:
            found.append(rule)
            todo += [name_of(chain, target or "@" + map) for target, map in JUMP.findall(rule)]
    return found


def choose_firewall(wanted):
    """iptables where it exists (its rules share the chains that a DROP
    policy lives in, so they can open the way); else nft."""
    if wanted != "auto":
        return wanted
    for tool in ("iptables", "nft"):
        if shutil.which(tool):
            return tool
    raise UserError("neither iptables nor nft found: install one (apt-get install iptables)")


def kill_switch_firewall(wanted):
    """The client's firewall tool for its kill switch, or None: with
    `--firewall none`, or (with a warning) when neither tool is there."""
    if wanted == "none":
        return None
    try:
        return choose_firewall(wanted)
    except UserError:
        log("udptun: warning: neither iptables nor nft found: no kill switch, so traffic may go around the "
            "tunnel while another program has broken its routing (apt-get install nftables)")
        return None


def mss_for(mtu, network):
    """The largest TCP segment the tunnel carries whole: its MTU less the IP
    header (20 bytes for IPv4, 40 for IPv6) and the TCP header (20)."""
    return str(mtu - (40 if network.version == 4 else 60))


# Where a client never goes through the VPS unless --reach opens the way:
# the networks a cloud VPS reaches besides the internet, often without any
# password, since only the VPS was expected to ask.
PRIVATE = {
    4: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918: a VPC, docker0, the provider's LAN
        "100.64.0.0/10",     # RFC 6598, carrier-grade NAT; Alibaba Cloud's metadata, 100.100.100.200
        "169.254.0.0/16",    # RFC 3927, link-local; the metadata of AWS, GCP, Azure, Oracle (169.254.169.254)
        "168.63.129.16/32"],  # Azure's WireServer (host agent and DNS): a public address, but the host's
    6: ["fc00::/7",          # RFC 4193, unique local; AWS's IPv6 metadata, fd00:ec2::254
        "fe80::/10"],        # RFC 4291, link-local
}
NFT_FAMILY = {4: "ip", 6: "ip6"}      # nft's name for the tables (and addresses) of each IP version
IPTABLES = {4: "iptables", 6: "ip6tables"}
PING = {4: ["-p", "icmp", "--icmp-type", "echo-request"], 6: ["-p", "ipv6-icmp", "--icmpv6-type", "echo-request"]}


class Openings:
    """What the server's firewall lets a client do, for one IP version: the
    settings of iptables_rules and nft_commands, made once from the
    command line. `address` is the server's own tunnel address (an
    IPv4Interface or IPv6Interface: its network is the tunnel's subnet);
    `reach`, the networks of that version opened with --reach; `ports`,
    the VPS's own (port, "tcp" or "udp") opened with --reach PORT/PROTO;
    `connections`, how many a tunnel address may have open at once."""

    def __init__(self, dev, out_if, address, mtu, nat=True, client_to_client=False, reach=(), ports=(),
                 connections=DEFAULT_MAX_CONNECTIONS):
        self.dev, self.out_if, self.address, self.mtu, self.connections = dev, out_if, address, mtu, connections
        self.nat, self.client_to_client, self.reach, self.ports = nat, client_to_client, list(reach), list(ports)
        self.network, self.version = address.network, address.version


def chains_of(dev):
    """The names of our own iptables chains: what the server's clients may
    forward, and what they may ask of the VPS itself. (At most 28
    characters, XT_EXTENSION_MAXNAMELEN in <linux/netfilter/x_tables.h>
    less its NUL: 11 here and 15 for the device.)"""
    return {"FORWARD": f"udptun-fwd-{dev}", "INPUT": f"udptun-in-{dev}"}


def iptables_rules(o):
    """The server's iptables rules as (table, chain, rule), without -A,
    for Openings `o`. The same rules serve ip6tables, with IPv6's subnet.

    FORWARD and INPUT rules live in chains of our own, each entered by one
    jump at the top of its built-in chain, as Docker's DOCKER-USER is. The
    jump goes in last, with one command, once the chain is whole: another
    tool that inserts rules at the same moment (Docker, at boot) cannot
    come between ours, and an ACCEPT of ours never lands below a DROP.

    - udptun-fwd-DEV, what a client may forward, in this order:
        a new connection past NEW_CONNECTIONS_PER_SECOND from one tunnel
          address (after a burst of NEW_CONNECTIONS_BURST): drop;
        a new connection past `connections` open from one tunnel address:
          drop (each takes a place in the kernel's connection tracking
          table, which is shared by the whole VPS: a stranger opening a
          new flow with each packet would fill it, and nobody could open
          a connection through the NAT any more). The kernel counts them
          by walking the address's list for each new one, which the rate
          limit above spares it under a flood of new flows (unlimited, the
          walk took a third of the server's CPU time);
        --reach networks: accept;
        with --client-to-client, from the tunnel back into it: accept;
        PRIVATE networks (a VPC, the cloud's metadata service): drop;
        from the tunnel out of the internet interface: accept;
        into the tunnel, replies only (RELATED,ESTABLISHED): accept;
        anything else from or into the tunnel: drop.
      So a client reaches the internet and nothing else, whatever the
      FORWARD policy, and nobody outside can open a connection to a client.
    - udptun-in-DEV, what a client may ask of the VPS itself: replies, a
      ping to its tunnel address, the ports opened with --reach; nothing
      else, whatever the VPS listens on. A provider's security group guards
      what comes from the internet; what comes out of the tunnel never
      crosses it.
    - MASQUERADE (nat): packets from clients leave with the server's
      address, out of the internet interface and to each --reach network
      (a VPC behind eth1 has no route back to the tunnel's subnet).
    - TCPMSS (mangle): a SYN crossing the tunnel gets an MSS that fits its
      MTU, so TCP never sends segments the tunnel would have to fragment.
    The last two are one rule per need, appended: their place in the
    chain changes nothing.
    """
    dev, c = o.dev, ["-m", "comment", "--comment", tag(o.dev)]
    fwd, inp = chains_of(dev)["FORWARD"], chains_of(dev)["INPUT"]
    clamp = ["-p", "tcp", "--tcp-flags", "SYN,RST", "SYN", *c, "-j", "TCPMSS", "--set-mss", mss_for(o.mtu, o.network)]
    rules = []
    if o.nat and o.out_if:
        rules.append(("nat", "POSTROUTING", ["-s", str(o.network), "-o", o.out_if, *c, "-j", "MASQUERADE"]))
    if o.nat:   # (but not back into the tunnel: a --reach 10.0.0.0/8 holds the clients too)
        rules += [("nat", "POSTROUTING", ["-s", str(o.network), "-d", str(net), "!", "-o", dev, *c, "-j", "MASQUERADE"])
                  for net in o.reach]
    # A connection's first packet: the kernel confirms a connection once
    # its first packet is through, and calls it NEW until a reply comes,
    # so a one-way UDP stream's every packet would count as a new connection.
    new = ["-i", dev, "-m", "conntrack", "--ctstate", "NEW", "!", "--ctstatus", "CONFIRMED"]
    # (A hashlimit's name: at most 15 characters in the match's first
    # revisions, IFNAMSIZ less its NUL in <linux/netfilter/xt_hashlimit.h>.
    # IPv4's and IPv6's are apart in the kernel, though they share it.)
    forward = [[*new, "-m", "hashlimit", "--hashlimit-above", f"{NEW_CONNECTIONS_PER_SECOND}/sec",
                "--hashlimit-burst", str(NEW_CONNECTIONS_BURST), "--hashlimit-mode", "srcip",
                "--hashlimit-name", f"udptun-{dev}"[:15], *c, "-j", "DROP"],
               [*new, "-m", "connlimit", "--connlimit-above", str(o.connections),
                "--connlimit-mask", str(o.address.max_prefixlen), *c, "-j", "DROP"]]
    forward += [["-i", dev, "-d", str(net), *c, "-j", "ACCEPT"] for net in o.reach]
    if o.client_to_client:
        forward.append(["-i", dev, "-o", dev, *c, "-j", "ACCEPT"])
    forward += [["-i", dev, "-d", net, *c, "-j", "DROP"] for net in PRIVATE[o.version]]
    if o.out_if:
        forward.append(["-i", dev, "-o", o.out_if, *c, "-j", "ACCEPT"])
    forward.append(["-o", dev, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *c, "-j", "ACCEPT"])
    forward += [["-i", dev, *c, "-j", "DROP"], ["-o", dev, *c, "-j", "DROP"]]
    rules += [("filter", fwd, rule) for rule in forward]
    rules += [("filter", inp, rule) for rule in (
        ["-i", dev, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *c, "-j", "ACCEPT"],
        ["-i", dev, "-d", str(o.address.ip), *PING[o.version], *c, "-j", "ACCEPT"],
        *(["-i", dev, "-p", proto, "--dport", str(port), *c, "-j", "ACCEPT"] for port, proto in o.ports),
        ["-i", dev, *c, "-j", "DROP"])]
    rules += [("mangle", "FORWARD", ["-o", dev, *clamp]), ("mangle", "FORWARD", ["-i", dev, *clamp])]
    return rules


def nft_table(dev):
    """nft keeps our rules in a table of our own: one delete removes them
    all. Its name must be unique for every device name, and nft takes only
    letters, digits and '_' in one: any other byte is written as _ and its
    two hex digits (tun-0: udptun_tun_2d0; tun_0: udptun_tun_5f0)."""
    return "udptun_" + "".join(chr(b) if chr(b).isalnum() and b < 128 else f"_{b:02x}" for b in dev.encode())


def nft_commands(o):
    """The same rules as iptables_rules, for nft (nft(8)), in one table
    (of family ip or ip6, as `o.version` is). A table is ours alone: no
    other tool can put a rule between two of ours.

    A caveat of nftables: an accept in our table does not override a drop in
    another table on the same hook, so a DROP policy set elsewhere (firewalld,
    or iptables-nft's own FORWARD chain) still drops tunnel traffic. Our
    drops hold whatever other tables say.
    """
    dev, family = o.dev, NFT_FAMILY[o.version]
    t = [family, nft_table(dev)]
    mss = mss_for(o.mtu, o.network)
    syn = ["tcp", "flags", "&", "(syn|rst)", "==", "syn", "tcp", "option", "maxseg", "size", ">", mss,
           "tcp", "option", "maxseg", "size", "set", mss]
    icmp = {4: ["icmp", "type", "echo-request"], 6: ["icmpv6", "type", "echo-request"]}[o.version]
    chain = lambda name, hook, priority, kind="filter": [
        "add", "chain", *t, name, f"{{ type {kind} hook {hook} priority {priority} ; }}"]
    rule = lambda name, *words: ["add", "rule", *t, name, *words]
    address_type = {4: "ipv4_addr", 6: "ipv6_addr"}[o.version]
    first = ["ct", "state", "new", "ct", "status", "&", "confirmed", "==", "0"]   # (a connection's first packet)
    commands = [["add", "set", *t, "connections", f"{{ type {address_type} ; size 65535 ; flags dynamic ; }}"],
                ["add", "set", *t, "new_connections",
                 f"{{ type {address_type} ; size 65535 ; flags dynamic,timeout ; timeout 1m ; }}"],
                chain("forward", "forward", 0),
                rule("forward", "iifname", dev, *first, "update", "@new_connections",
                     f"{{ {family} saddr limit rate over {NEW_CONNECTIONS_PER_SECOND}/second "
                     f"burst {NEW_CONNECTIONS_BURST} packets }}", "drop"),
                rule("forward", "iifname", dev, *first, "add", "@connections",
                     f"{{ {family} saddr ct count over {o.connections} }}", "drop")]
    commands += [rule("forward", "iifname", dev, family, "daddr", str(net), "accept") for net in o.reach]
    if o.client_to_client:
        commands.append(rule("forward", "iifname", dev, "oifname", dev, "accept"))
    commands.append(rule("forward", "iifname", dev, family, "daddr", "{ " + ", ".join(PRIVATE[o.version]) + " }",
                         "drop"))
    if o.out_if:
        commands.append(rule("forward", "iifname", dev, "oifname", o.out_if, "accept"))
    commands.append(rule("forward", "oifname", dev, "ct", "state", "established,related", "accept"))
    commands += [rule("forward", "iifname", dev, "drop"), rule("forward", "oifname", dev, "drop")]
    commands += [chain("input", "input", 0),
                 rule("input", "iifname", dev, "ct", "state", "established,related", "accept"),
                 rule("input", "iifname", dev, family, "daddr", str(o.address.ip), *icmp, "accept")]
    commands += [rule("input", "iifname", dev, proto, "dport", str(port), "accept") for port, proto in o.ports]
    commands.append(rule("input", "iifname", dev, "drop"))
    # The clamp must come first to see what the accepts above take: nft
    # stops at the first verdict. So it has its own chain, earlier (-150, mangle).
    commands += [chain("clamp", "forward", -150),
                 rule("clamp", "oifname", dev, *syn), rule("clamp", "iifname", dev, *syn)]
    masquerade = ([rule("postrouting", family, "saddr", str(o.network), "oifname", o.out_if, "masquerade")]
                  if o.out_if else [])
    masquerade += [rule("postrouting", family, "saddr", str(o.network), family, "daddr", str(net), "oifname", "!=",
                        dev, "masquerade") for net in o.reach]   # (as in iptables_rules)
    if o.nat and masquerade:
        commands += [chain("postrouting", "postrouting", 100, "nat"), *masquerade]
    return [["nft", *c] for c in commands]


def add_firewall(changes, firewall, o):
    """The rules of iptables_rules (or nft_commands) for Openings `o`."""
    if firewall == "nft":
        table = [NFT_FAMILY[o.version], nft_table(o.dev)]
        changes.make(["nft", "add", "table", *table], undo=["nft", "delete", "table", *table])
        for command in nft_commands(o):
            changes.make(command)   # undone with the table
        return
    # -w: wait for the xtables lock that Docker or fail2ban may hold, not fail.
    tool = [IPTABLES[o.version], "-w"]
    chains = chains_of(o.dev)
    for chain in chains.values():   # (deleted last, once nothing jumps to it and it is empty)
        changes.make([*tool, "-t", "filter", "-N", chain], undo=[*tool, "-t", "filter", "-X", chain])
    filled = set()
    for table, chain, rule in iptables_rules(o):
        if chain in chains.values():   # one flush undoes all the rules of our own chain
            undo = None if chain in filled else [*tool, "-t", table, "-F", chain]
            filled.add(chain)
        else:
            undo = [*tool, "-t", table, "-D", chain, *rule]
        changes.make([*tool, "-t", table, "-A", chain, *rule], undo=undo)
    for builtin, chain in chains.items():   # and now, whole, they take effect: one insert each
        jump = ["-m", "comment", "--comment", tag(o.dev), "-j", chain]
        changes.make([*tool, "-t", "filter", "-I", builtin, "1", *jump],
                     undo=[*tool, "-t", "filter", "-D", builtin, *jump])


def free_table(system, versions):
    """A number that no routing rule (as a table or a mark) and no routing
    table uses yet, from FIRST_TABLE on: the client's routing table and mark."""
    used = "".join(system.query("ip", f"-{v}", what, "show", *table)
                   for v in versions for what, table in (("rule", ()), ("route", ("table", "all"))))
    n = FIRST_TABLE
    while re.search(rf"(lookup|table) {n}\b|fwmark {n:#x}\b", used):
        n += 1
    return n


class Routing:
    """Send `routes` into the tunnel, all but the tunnel's own datagrams;
    and keep it so, whatever other programs do to the routing rules.

    The routes go into a routing table of their own, number `table`, and
    two rules (ip-rule(8)) pick a table for each packet, the second first:
      1. `table main suppress_prefixlength 0`: the main table, but not its
         default route (prefix length 0). The laptop's own networks (its LAN,
         the tunnel's subnet) stay reachable as before.
      2. `not fwmark N table N`: every packet not marked N: the tunnel.
    The tunnel's own datagrams carry mark N (SO_MARK, see connect_udp), so
    rule 2 passes them by and they take the main table's default route,
    whichever it is at that moment. Nothing pins a gateway that a new Wi-Fi
    or a resume from suspend could make stale. This is wg-quick's design;
    see https://www.wireguard.com/netns/ ("Improved Rule-based Routing").
    IPv6 has its own rules and table, the same way.

    Each route has an "unreachable" twin of the largest metric, which takes
    over when the route itself goes, with the device (a crash) or with its
    link (`ip link set tun0 down`): what belongs in the tunnel then fails
    at once, and never falls through to the main table's default route. A
    --dns server gets a rule of its own, ahead of rule 1, so its queries
    take the tunnel even where the LAN's routes would win. A `blocked`
    network (IPv6, when the tunnel cannot carry it) gets only its twin:
    it fails at once, and never goes around the tunnel.

    Each rule has a priority of its own, counting down from just below the
    rules already there (where `ip rule add` would put it): so a rule that
    is deleted can be put back in its place, and adding a rule that is
    there fails ("File exists") instead of adding it twice. Other programs
    do delete them: systemd-networkd, which manages the network on Ubuntu
    Server and wherever netplan is used, may delete every rule it did not
    make when it starts (ManageForeignRoutingPolicyRules=yes; systemd 257
    does at a restart, 252 does not), at a package upgrade or `netplan apply`. So repair() puts back what is gone (see
    Client.tick); meanwhile the kill switch (see KillSwitch) stops what
    would go around the tunnel.

    What this does not stop: a route more specific than the default that
    the LAN's DHCP server puts in the main table wins by rule 1 (as with
    wg-quick; CVE-2024-3661, "TunnelVision"), and the kill switch lets it
    through where it leads to a private network.
    """

    def __init__(self, changes, dev, table, priorities):
        self.changes, self.dev, self.table = changes, dev, str(table)
        self.priorities = dict(priorities)   # IP version -> the next rule's (see first_priorities)
        self.kept = []                       # the commands that add what must stay in place

    def add(self, routes, dns=(), blocked=()):
        n = self.table
        for version in sorted({net.version for net in [*routes, *blocked]}):
            for net in [*routes, *blocked]:
                if net.version == version:
                    if net in routes:   # (goes with the device: no undo)
                        self._make(version, "route", [str(net), "dev", self.dev, "table", n], undo=False)
                    self._make(version, "route", ["unreachable", str(net), "table", n, "metric", str(LAST_RESORT)])
            rules = [["not", "fwmark", n, "table", n], ["table", "main", "suppress_prefixlength", "0"]]
            rules += [["to", str(a), "table", n] for a in dns if a.version == version]
            for rule in rules:
                self.rule(version, rule)

    def around(self, server, nets):
        """Send what goes to the server's own address (`ssh` to the VPS, say)
        outside the tunnel, as the LAN would without it: a rule that looks
        `server` up in the main table, ahead of the others. The VPS then
        sees it come from the laptop's public address, through the
        provider's security group, which never sees what comes out of the
        tunnel (the server's firewall lets tunnel traffic reach no service
        of the VPS's). Only where `nets` would take it into the tunnel:
        return the address if so, else None."""
        address = host_ip(server)
        if address.is_link_local or not any(address in net for net in nets):   # (the LAN's own: never tunnelled)
            return None
        self.rule(address.version, ["to", str(address), "table", "main"])
        return address

    def rule(self, version, words):
        if self.priorities[version] < 1:   # (0 is the local table's)
            raise UserError(f"no routing rule priority is free below the rules in place (`ip -{version} rule`): "
                            "delete the one of the lowest priority but 0, or give it a larger number")
        words = ["pref", str(self.priorities[version]), *words]
        self.priorities[version] -= 1
        self._make(version, "rule", words)

    def _make(self, version, what, words, undo=True):
        v = f"-{version}"
        add = ["ip", v, what, "add", *words]
        self.changes.make(add, undo=["ip", v, what, "del", *words] if undo else None)
        self.kept.append(add)

    def repair(self):
        """Put back what another program deleted. Each rule and route is
        added again; what is still there fails with "File exists", changes
        nothing and is not shown. Return how many were put back."""
        put_back = [argv for argv in self.kept if self.changes.system.again(*argv)]
        if put_back:
            log(f"udptun: {len(put_back)} of the tunnel's routes and rules were deleted by another program: put back")
        return len(put_back)


def first_priorities(system, versions):
    """For each IP version, the priority just below the rules already there
    but the `local` one (0): where `ip rule add` without a priority would
    put a rule, ahead of the main table's (32766)."""
    found = {}
    for v in versions:
        taken = [int(p) for p in re.findall(r"^(\d+):", system.query("ip", f"-{v}", "rule", "show"), re.M)]
        found[v] = min([p for p in taken if p > 0] or [32766]) - 1
    return found


# Where the client's kill switch lets packets out around the tunnel: what
# never leaves the link (link-local, multicast, broadcast); and the LAN,
# where it has private addresses (a printer, the home router's admin page).
LINK = {4: ["169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32"], 6: ["fe80::/10", "ff00::/8"]}
LAN = {4: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], 6: ["fc00::/7"]}   # RFC 1918, RFC 4193
# And what a laptop needs of its network to stay on it, to whatever address:
# DHCP (RFC 2131: client port 68, server 67; DHCPv6, RFC 8415: 546, 547), and
# IPv6's router and neighbour discovery (RFC 4861: ICMPv6 types 133 to 137).
NEIGHBOURLY = {4: [["udp", "68", "67"]], 6: [["udp", "546", "547"], *(["icmpv6", str(t)] for t in range(133, 138))]}


class KillSwitch:
    """The client's firewall: what routing sends into the tunnel leaves by
    the tunnel or not at all, even when the routing breaks. Policy routing
    alone fails open: when another program deletes the client's rules
    (see Routing), packets take the main table's default route, straight
    out of the Wi-Fi, until they are put back. Mullvad's and ProtonVPN's
    apps stop that with a firewall; so do we. Output is let through when
    it goes out of the tunnel, out of `lo`, carries the tunnel's own mark
    (its datagrams), goes to the server's own address (see Routing.around)
    or to a LINK or LAN network; a packet for a tunnelled network that would
    leave any other way is rejected, at once, as "administratively
    prohibited". With --dns, DNS goes to no other server, whatever
    resolv.conf says after a change of network. Always let out, as
    Mullvad's app does: DHCP and IPv6's neighbour discovery (NEIGHBOURLY),
    which keep the laptop on its network.

    The rules of an IP version live in a chain of our own (iptables) or a
    table of our own (nft), entered by one jump at the top of OUTPUT, as
    the server's are (see iptables_rules). A --route inside a LAN network
    is rejected before the LAN is let through. What a LAN with public
    addresses (its own IPv6 prefix) serves is out of reach while the
    client runs, and what the laptop forwards (containers, virtual
    machines) is not covered.
    """

    def __init__(self, changes, firewall, dev, mark):
        self.changes, self.firewall, self.dev, self.mark = changes, firewall, dev, str(mark)

    def add(self, routes, dns=(), around=()):
        for version in sorted({net.version for net in routes}):
            nets = [net for net in routes if net.version == version]
            rules = self.rules(version, nets, dns, [a for a in around if a.version == version])
            if self.firewall == "nft":
                table = [NFT_FAMILY[version], nft_table(self.dev)]
                self.changes.make(["nft", "add", "table", *table], undo=["nft", "delete", "table", *table])
                self.changes.make(["nft", "add", "chain", *table, "output",
                                   "{ type filter hook output priority 0 ; }"])   # (undone with the table)
                for words in rules:
                    self.changes.make(["nft", "add", "rule", *table, "output", *self.nft(version, words)])
                continue
            tool, chain = [IPTABLES[version], "-w", "-t", "filter"], kill_switch_chain(self.dev)
            self.changes.make([*tool, "-N", chain], undo=[*tool, "-X", chain])
            for i, words in enumerate(rules):   # (one flush undoes them all)
                self.changes.make([*tool, "-A", chain, *self.iptables(version, words)],
                                  undo=None if i else [*tool, "-F", chain])
            jump = ["-m", "comment", "--comment", tag(self.dev), "-j", chain]
            self.changes.make([*tool, "-I", "OUTPUT", "1", *jump], undo=[*tool, "-D", "OUTPUT", *jump])

    def let_through(self, address):
        """Let packets to `address` out around the tunnel, ahead of the
        rest: the server's new address, when its name has one."""
        words = ["to", str(address), "accept"]
        if self.firewall == "nft":
            table = [NFT_FAMILY[address.version], nft_table(self.dev)]
            self.changes.make(["nft", "insert", "rule", *table, "output", *self.nft(address.version, words)])
        else:
            self.changes.make([IPTABLES[address.version], "-w", "-t", "filter", "-I", kill_switch_chain(self.dev),
                               "1", *self.iptables(address.version, words)])   # (undone with the flush)

    def rules(self, version, nets, dns, around):
        """The rules, in order, each as words: what it matches, then accept or reject."""
        rules = [["out", self.dev, "accept"], ["out", "lo", "accept"], ["mark", self.mark, "accept"]]
        rules += [[*words, "accept"] for words in NEIGHBOURLY[version]]
        if dns:   # (to the server's own address too: only the tunnel)
            rules += [["dns", "udp", "reject"], ["dns", "tcp", "reject"]]
        rules += [["to", str(a), "accept"] for a in around]
        rules += [["to", net, "accept"] for net in LINK[version]]
        rules += [["to", str(net), "reject"] for net in nets if net.prefixlen]
        rules += [["to", net, "accept"] for net in LAN[version]]
        rules += [["to", str(net), "reject"] for net in nets if not net.prefixlen]
        return rules

    def iptables(self, version, words):
        what, *values, verdict = words
        value = values[0]
        match = {"out": ["-o", value], "mark": ["-m", "mark", "--mark", value], "to": ["-d", value],
                 "dns": ["-p", value, "--dport", "53"], "udp": ["-p", "udp", "--sport", value, "--dport", values[-1]],
                 "icmpv6": ["-p", "ipv6-icmp", "--icmpv6-type", value]}[what]
        if verdict == "accept":
            return [*match, "-j", "RETURN"]   # (to OUTPUT's own rules, and its policy)
        prohibited = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}[version]
        return [*match, "-j", "REJECT", *(["--reject-with", prohibited] if what == "to" else [])]

    def nft(self, version, words):
        what, *values, verdict = words
        value = values[0]
        match = {"out": ["oifname", value], "mark": ["meta", "mark", value],
                 "to": [NFT_FAMILY[version], "daddr", value], "dns": [value, "dport", "53"],
                 "udp": ["udp", "sport", value, "udp", "dport", values[-1]], "icmpv6": ["icmpv6", "type", value]}[what]
        if verdict == "accept":
            return [*match, "accept"]
        icmp = {4: "icmp", 6: "icmpv6"}[version]
        return [*match, "reject", *(["with", icmp, "type", "admin-prohibited"] if what == "to" else [])]


def kill_switch_chain(dev):
    """The client's iptables chain (at most 28 characters: see chains_of)."""
    return f"udptun-out-{dev}"


def remove_tagged_rules(system, dev):
    """Delete every rule of ours that a run which could not clean up left:
    iptables and ip6tables rules carrying our tag and our chains, and our
    nft tables. `iptables -S` prints rules as the -A commands that would
    add them; the same words after -D delete them."""
    ours = {*chains_of(dev).values(), kill_switch_chain(dev)}
    for tool in IPTABLES.values():
        if not shutil.which(tool):
            continue
        for table in ("filter", "nat", "mangle"):
            # (check=False: a kernel without IPv6 has no ip6tables tables to list)
            lines = [shlex.split(line) for line in system.query(tool, "-w", "-t", table, "-S", check=False).splitlines()]
            for words in lines:
                if words[:1] == ["-A"] and tag(dev) in words:
                    system.change(tool, "-w", "-t", table, "-D", *words[1:], check=False)
            for words in lines:
                if words[:1] == ["-N"] and words[1:2] and words[1] in ours:
                    system.change(tool, "-w", "-t", table, "-F", words[1], check=False)
                    system.change(tool, "-w", "-t", table, "-X", words[1], check=False)
    if shutil.which("nft"):
        # (check=False: nft may be there without a kernel that has nf_tables,
        # on a machine whose firewall is iptables-legacy)
        tables = system.query("nft", "list", "tables", check=False).splitlines()
        for family in NFT_FAMILY.values():
            if f"table {family} {nft_table(dev)}" in tables:
                system.change("nft", "delete", "table", family, nft_table(dev), check=False)


def resolver_tool():
    """Who keeps the system's resolver configuration: systemd-resolved (when
    /etc/resolv.conf points at its stub), resolvconf, or nobody (the file)."""
    try:
        with open(RESOLV_CONF, "rb") as f:
            stub = b"127.0.0.53" in f.read() or os.path.realpath(RESOLV_CONF).startswith("/run/systemd/")
    except OSError:
        stub = False
    if stub and shutil.which("resolvectl"):
        return "resolvectl"
    return "resolvconf" if shutil.which("resolvconf") else "file"


def set_dns(changes, dev, servers):
    """Resolve names through `servers` while the tunnel is up, each way with
    its undo. Return what must be kept so (see ResolvConf), or None."""
    tool = resolver_tool()
    text = "".join(f"nameserver {a}\n" for a in servers)
    if tool == "resolvectl":
        # systemd-resolved keeps DNS servers per link: ours, for every domain
        # ("~."), and the default route for names no other link claims.
        # `revert` undoes all three (and the link's deletion would too).
        changes.make(["resolvectl", "dns", dev, *servers], undo=["resolvectl", "revert", dev])
        changes.make(["resolvectl", "domain", dev, "~."])
        changes.make(["resolvectl", "default-route", dev, "true"])
    elif tool == "resolvconf":
        # A record of our own, first (-m 0) and alone (-x, exclusive). That
        # is openresolv; Debian's resolvconf ignores both, and orders its
        # records by name (/etc/resolvconf/interface-order), where `tun*`
        # comes before every LAN's (eth*, wl*): so a record named so. The
        # LAN's servers may follow ours there, but the kill switch lets no
        # query out to them (see KillSwitch).
        record = dev if dev.startswith("tun") else f"tun.{dev}"
        changes.make(["resolvconf", "-a", record, "-m", "0", "-x"], undo=["resolvconf", "-d", record, "-f"],
                     input=text)
    else:
        return ResolvConf(changes, dev, text)
    return None


class ResolvConf:
    """--dns with nobody managing /etc/resolv.conf: we write it ourselves,
    with our servers; its search domains and options stay as they were.

    When the laptop changes networks, its DHCP client or NetworkManager
    writes the file anew, with the new LAN's resolver. keep() (once a
    second, see Client.tick) writes ours again; and from then on, what
    they wrote is what comes back when we stop."""

    def __init__(self, changes, dev, text):
        self.changes, self.dev, self.text = changes, dev, text
        try:
            found = self.read()
        except OSError as e:
            raise UserError(f"cannot read {RESOLV_CONF}: {e.strerror}") from None
        self.ours = self.over(found)
        self.undo = ["write", RESOLV_CONF, found, self.ours]   # (only if it still holds ours)
        changes.make(["write", RESOLV_CONF, self.ours], undo=self.undo)

    @staticmethod
    def read():
        with open(RESOLV_CONF, "rb") as f:
            return f.read().decode("latin-1")

    def over(self, found):
        """Our file, in place of `found`."""
        keep = "".join(line + "\n" for line in found.splitlines()
                       if line.split()[:1] in (["search"], ["domain"], ["options"]))
        return f"# udptun ({self.dev}): the file as it was comes back when udptun stops\n" + self.text + keep

    def keep(self):
        try:
            found = self.read()
        except OSError:   # (being replaced this very moment: the next tick sees it)
            return
        if found == self.ours:
            return
        log(f"udptun: {RESOLV_CONF} was written anew (a new network?): our --dns servers again")
        ours = self.over(found)
        undo = ["write", RESOLV_CONF, found, ours]
        self.changes.amend(self.undo, undo)
        self.undo = undo
        if self.changes.system.change("write", RESOLV_CONF, ours, found, check=False) is None:   # (if still theirs)
            self.ours = ours


def state_dir():
    """Where this run keeps its journal and status.

    /run is shared by all network namespaces of a machine, so two udptuns
    with the same device name in different namespaces (the tests, a lab)
    would overwrite each other's files. A run inside `ip netns exec NAME`
    uses /run/udptun/netns-NAME instead, found the way `ip netns identify`
    does: by the inode of the namespace.
    """
    try:
        me = os.stat("/proc/self/ns/net")
        names = sorted(os.listdir("/run/netns"))
    except OSError:   # (no /run/netns: no named namespaces)
        return STATE_ROOT
    for name in names:
        try:
            st = os.stat(os.path.join("/run/netns", name))
        except OSError:   # its name deleted meanwhile (`ip netns del`): skip it
            continue
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return os.path.join(STATE_ROOT, "netns-" + name)
    return STATE_ROOT


def state_path(dev, suffix):
    return os.path.join(state_dir(), dev + suffix)


class Journal:
    """A file that lists the undo commands of changes not yet undone, and a
    lock that says a run is using the device.

    The journal is written *before* each change is made (write-ahead), so
    that after a `kill -9` the next start, or `udptun down`, can replay the
    undos. It is read back with care: root's own regular file, writable by
    root only, not through a link, and only commands of the shapes udptun
    writes are replayed (see replayable), whatever else the file says.

    The lock is an flock(2) on DEV.lock, held for the whole run: the kernel
    lets go of it however the process ends, so a lock that cannot be taken
    means a live run, never a stale file or a reused pid.
    """

    def __init__(self, dev, dry_run=False):
        self.path = state_path(dev, ".journal")
        self.lock_path = state_path(dev, ".lock")
        self.dev, self.dry_run = dev, dry_run
        self.lock_fd = None

    def lock(self):
        """Take the device's lock, or a UserError if a live run holds it.
        (A dry run takes none: it changes nothing, and may not be root.)"""
        if self.dry_run:
            return
        while True:
            try:
                os.makedirs(os.path.dirname(self.lock_path), mode=0o755, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                # Another run, stopping, removed the folders (see release)
                # between our mkdir and our open. Make them again.
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"udptun is already running on {self.dev} here: stop it first, "
                                "or pick another --dev") from None
            # The run before us may have removed the file as we opened it:
            # then our lock is on a file nobody else will see. Start over.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    self.lock_fd = fd
                    return
            os.close(fd)

    def held(self):
        """Whether a live run holds the lock: /proc/locks lists the inode of
        every file locked with flock(2). Only looks: taking the lock, even
        for a moment, could turn away a run that is starting."""
        try:
            st = os.stat(self.lock_path)
            with open("/proc/locks") as f:   # "1: FLOCK ADVISORY WRITE pid MAJ:MIN:INODE 0 EOF"
                where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
                return any(line.split()[1:2] == ["FLOCK"] and line.split()[5:6] == [where] for line in f)
        except OSError:
            return False

    def load(self):
        """The undo commands an earlier run left, or []."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as e:   # ELOOP: a link
            log(f"udptun: warning: {self.path} not read: {e.strerror}")
            return []
        with os.fdopen(fd) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                log(f"udptun: warning: {self.path} not read: not a regular file that only root may write")
                return []
            try:
                undo = json.load(f).get("undo", [])
            except (ValueError, AttributeError):
                return []
        if not isinstance(undo, list):
            return []
        good = [argv for argv in undo if replayable(argv)]
        for argv in undo:
            if argv not in good:
                log(f"udptun: warning: {self.path}: not a command udptun writes, not run: {argv!r}"[:300])
        return good

    def save(self, undos):
        """Write the list of undos (an empty list: no journal at all)."""
        if self.dry_run:
            return
        if not undos:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        tmp = self.path + ".tmp"
        # 0644 whatever the umask: load() reads only a file that only root may write.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"undo": undos}, f)   # (who is running is the lock's to say, not a pid's)
        os.replace(tmp, self.path)   # atomic: a reader sees the old or the new list

    def release(self):
        """Let go of the lock (removing its file first), and remove the
        folders if that leaves them empty."""
        if self.dry_run:
            return
        if self.lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            os.close(self.lock_fd)
            self.lock_fd = None
        for folder in (os.path.dirname(self.path), STATE_ROOT):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def replayable(argv):
    """Whether `argv` has the shape of an undo that udptun writes: the one
    check between a journal file and a root shell."""
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        return False
    tool = argv[0]
    if tool == "ip":
        return argv[1:2] in (["-4"], ["-6"]) and argv[2:4] in (["rule", "del"], ["route", "del"])
    if tool in ("iptables", "ip6tables"):
        return (argv[1:3] == ["-w", "-t"] and argv[3:4] in (["filter"], ["nat"], ["mangle"])
                and not any(a.startswith("--modprobe") for a in argv)   # (it names a program to run)
                and (argv[4:5] == ["-D"] or len(argv) == 6 and argv[4] in ("-F", "-X") and argv[5].startswith("udptun-")))
    if tool == "nft":
        return (len(argv) == 5 and argv[1:3] == ["delete", "table"] and argv[3] in ("ip", "ip6")
                and argv[4].startswith("udptun_"))
    if tool == "sysctl":
        return (len(argv) >= 3 and argv[1] == "-w" and argv[2].startswith(("net.", "net/")) and "=" in argv[2]
                and ".." not in argv[2] and "\0" not in argv[2] and (len(argv) == 3 or argv[3].startswith(tag(""))))
    if tool in ("resolvectl", "resolvconf"):
        return argv[1:2] in (["revert"], ["-d"])
    return tool == "write" and argv[1:2] == [RESOLV_CONF] and len(argv) == 4


def recover(system, journal, dev):
    """Take the device's lock, then undo whatever an earlier run on `dev`
    left behind (killed with -9, or the machine lost power mid-run): replay
    its journal newest first, then remove any rule that still carries our
    tag. Undo comes before do. Return the undos that failed (and not for
    want of anything to undo), oldest first: they are tried again later."""
    journal.lock()
    failed = []
    old = journal.load()
    if old:
        log(f"udptun: undoing what an earlier run on {dev} left behind")
        for argv in reversed(old):
            error = system.change(*argv, check=False)
            if error and not already_undone(error):
                failed.insert(0, argv)
    if not system.dry_run:
        remove_tagged_rules(system, dev)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path(dev, ".status"))   # a dead run's status would mislead
    journal.save(failed)
    if failed:
        log(f"udptun: warning: {len(failed)} undo(s) failed; `udptun.py down` will try again")
    return failed


def lock_and_recover(args):
    """What both sides do first: check root, take the device's lock and
    undo what an earlier run left. Returns the Changes to make the run's
    changes on, as a `with` block that undoes them (and lets go of the lock)."""
    system = System(dry_run=args.dry_run)
    if not args.dry_run and os.geteuid() != 0:
        raise UserError(f"must run as root: sudo python3 {sys.argv[0]} {args.command} ...")
    journal = Journal(args.dev, dry_run=args.dry_run)
    if args.dry_run and journal.held():
        raise UserError(f"udptun is already running on {args.dev} here: its plan would not be this one")
    try:
        leftovers = recover(system, journal, args.dev)
    except BaseException:   # an error, or a signal: let go of the lock all the same
        journal.release()
        raise
    return Changes(system, journal, leftovers)


# ================ 9. Going faster
# The plain loop makes a few system calls per packet, and in Python each
# costs microseconds: it moves about as much as socat does. This chapter
# moves many packets per call. Nothing in it changes what passes, only how
# fast: `--plain` leaves it out, and every test passes both ways.
#
# Each mechanism here says what it brings, as measured in one A/B run of
# the benchmark (bench_udptun.py) on the user's path: laptop, home NAT,
# tunnel, the VPS's NAT, a web host; medians of 2 rounds of 5 s, on a VM
# with 2 cores. "Without it" is udptun with that one mechanism taken out
# (the benchmark's udptun-no-gso, udptun-no-gro, udptun-no-merge and
# udptun-fifo), in the same run as the whole of it, which carried TCP
# 1.25 Gbit/s up and 1.29 down, 1.18 with 4 streams up, and 86 kpps of
# 64-byte UDP, at 10.2 CPU seconds per GB (both ends).

# The TUN device's side: every read() and write() on it can start with a
# header that describes many packets as one.
IFF_VNET_HDR = 0x4000   # <linux/if_tun.h>: read() and write() start with a struct virtio_net_hdr

# struct virtio_net_hdr (<linux/virtio_net.h>; host byte order on a TUN
# device): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset. It
# lets one write() carry many packets of one flow at once (see merge).
VNET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1   # the kernel completes the checksum at csum_start + csum_offset
VIRTIO_NET_HDR_GSO_TCPV4 = 1      # the packet stands for TCP segments of gso_size payload bytes
VIRTIO_NET_HDR_GSO_TCPV6 = 4      # ... the same over IPv6
VIRTIO_NET_HDR_GSO_UDP_L4 = 5     # ... for UDP datagrams of gso_size (TUN devices: Linux 6.2)
PLAIN_VNET_HDR = bytes(VNET_HDR.size)      # the header of an ordinary packet: no offload, checksums done


class VnetTun(Tun):
    """A TUN device whose every read() and write() starts with a struct
    virtio_net_hdr (IFF_VNET_HDR), which lets one write() carry many packets
    of a flow (see MergingWriter, and what that brings). We never ask the
    kernel for offloads on what we read (TUNSETOFFLOAD), so what we read is
    always one ordinary packet behind a header of zeros."""
    FLAGS = Tun.FLAGS | IFF_VNET_HDR
    vnet = True
    skip = VNET_HDR.size   # what precedes each packet read

    def read(self):
        try:
            return os.read(self.fd, self.skip + MAX_PACKET)[self.skip:]
        except BlockingIOError:
            return None

    def write(self, packet):
        super().write(PLAIN_VNET_HDR + packet)


# Batching system calls on the UDP side (see Batching.send_packets and
# recv_udp): one sendmsg() can carry many datagrams of one size (UDP GSO,
# Linux 4.18), and one recvmsg() can return many coalesced by the kernel
# (UDP GRO, Linux 5.0). On the wire each is still one raw IPv4 packet.
SOL_UDP = 17            # <netinet/in.h>: IPPROTO_UDP, the level of UDP's options
UDP_SEGMENT = 103       # <linux/udp.h>: send: cut this buffer into datagrams of N bytes
UDP_GRO = 104           # <linux/udp.h>: receive: coalesced datagrams, with their size
GSO_MAX_SEGMENTS = 64   # UDP_MAX_SEGMENTS in the kernel's include/linux/udp.h
GSO_MAX_BYTES = 65507   # the largest UDP payload: 65535 - 20 (IPv4) - 8 (UDP)

# A turn of the loop writes or sends BATCH packets in each direction, but
# no more than BATCH_BYTES, and reads or receives up to READ_AHEAD (more
# than it passes on: see FairQueue). A packet that arrives during a turn
# waits for the rest of it, so a turn's length is the delay a ping sees
# through a busy tunnel. But each turn costs its own system calls, spread
# over more packets in a longer turn. In a run of the benchmark on the
# full path of its own (medians of 2 rounds), 128 packets a turn against 64:
# TCP 1.31 against 1.24 Gbit/s up, 1.32 against 1.23 down, 1.23 against
# 1.10 with 4 streams, 86 against 73 kpps of 64-byte UDP, 9.9 against
# 10.6 CPU s/GB; a ping waited 2.0 against 1.2 ms (p50) during an upload,
# 1.5 against 0.9 during a download. With two clients at once (the
# benchmark's mixed load: a 300 Mbit/s TCP stream each way, and downloads
# back to back), in 150 s, 128 carried 21.2 GB, 64 carried 19.9 GB. So a
# turn passes on 128 packets, as wireguard-go's batches do (IdealBatchSize),
# and the bytes of 128 at the default MTU at most: with a larger MTU the
# bytes bind first.
BATCH = 128
BATCH_BYTES = BATCH * DEFAULT_MTU
READ_AHEAD = 2 * BATCH
# What a turn costs is mostly its writes to the TUN device: the kernel
# routes, filters and NATs each written packet in that write() (and on a
# VPS, sends it on), the same work for a run of packets merged into one
# (see MergingWriter) as for one packet that cannot be merged. So a turn
# writes at most WRITES runs, however few packets they hold: a stranger
# who sends each packet in a flow of its own cannot make a turn write 128
# times where a download's writes 3, and the queue is fair in cost
# between hosts.
WRITES = 16

# What the turns with a backlog cost, in ms of CPU time, counted in `status`
# by powers of two.
TURN_COSTS = ("<1", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64+")
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)   # room for UDP GRO's control message (an int)

# Packets wait in our own queues, one per direction and within it one per
# flow (see FairQueue). QUEUE_LIMIT bounds a direction: 2048 full-size
# packets are 2.8 MB, more than a TCP window through a tunnel this fast
# needs. QUANTUM is how many packets a busy flow moves before the next
# flow's turn (counted in packets: our scarce resource is work per packet,
# not bytes).
QUEUE_LIMIT = 2048
QUEUE_BYTES = 4 << 20   # and 4 MiB: with a large --mtu, the bytes bind first
QUANTUM = GSO_MAX_SEGMENTS   # (as many as one merged write may hold, see mergeable())
BUCKETS = 1024   # FIFOs that flows are hashed into: RFC 8290's default number of flow queues
HOST_BUCKETS = 64   # the server's: as many for each client (see FairQueue)
# Where a flow's key (see flow_of) holds a host's address, for IPv4's and
# IPv6's keys: the source, or the destination (see FairQueue's `host`).
HOST_IN_FLOW = {"src": (slice(0, 4), slice(0, 16)), "dst": (slice(4, 8), slice(16, 32))}

# The TCP header (RFC 9293) and the UDP header (RFC 768), offsets from
# their start. A TCP header is 20 bytes and options, its length in the
# high 4 bits of the data offset byte; a UDP header is 8 bytes.
TCP_SEQ, TCP_ACK = 4, 8            # sequence and acknowledgement numbers (32 bits each)
TCP_OFFSET, TCP_FLAGS = 12, 13     # data offset; flags
TCP_WINDOW, TCP_CHECKSUM, TCP_URGENT = 14, 16, 18   # (16 bits each; options from 20)
TCP_HEADER = 20
UDP_LENGTH, UDP_CHECKSUM = 4, 6    # (16 bits each: the length counts the header)
UDP_HEADER = 8
ACK, PSH = 0x10, 0x08   # a run may be merged only if each carries just ACK; PSH may end one
# What tells one flow from another: the addresses, then (TCP, UDP) the ports.
IPV4_ADDRESSES = slice(IPV4_SRC.start, IPV4_DST.stop)
IPV4_FLOW = slice(IPV4_SRC.start, IPV4_DST.stop + 4)   # (IPv4 without options: the ports follow at once)
IPV6_ADDRESSES = slice(IPV6_SRC.start, IPV6_DST.stop)
IPV6_FLOW = slice(IPV6_SRC.start, IPV6_DST.stop + 4)


# Every byte of the headers must be the same in each packet of a run, but
# those a flow changes from packet to packet: IPv4's length, ID and header
# checksum, IPv6's payload length, TCP's sequence number, PSH and checksum,
# and UDP's length and checksum (RFC 791, 8200, 9293, 768). tcp_run() and
# udp_run() compare all the rest at once: each packet's headers read as one
# big number, with those bytes masked out. (Field by field, with a slice
# each, cost twice as much: 1.1 against 0.5 µs a packet.)
def every_bit(*fields):
    """{offset: 0xFF} for each byte of these fields (slices of a header)."""
    return {at: 0xFF for field in fields for at in range(field.start, field.stop)}


VARYING_IPV4 = every_bit(IPV4_LENGTH, IPV4_ID, IPV4_CHECKSUM)
VARYING_IPV6 = every_bit(IPV6_LENGTH)
VARYING_TCP = {**every_bit(slice(TCP_SEQ, TCP_ACK), slice(TCP_CHECKSUM, TCP_URGENT)), TCP_FLAGS: PSH}
VARYING_UDP = every_bit(slice(UDP_LENGTH, UDP_HEADER))   # length and checksum


@functools.lru_cache(maxsize=None)
def header_mask(start, end, proto):
    """The mask for headers of `end` bytes whose TCP (or UDP) header begins
    at `start`: all ones but the bits that may vary in a run."""
    mask = bytearray(b"\xff" * end)
    for at, bits in (VARYING_IPV4 if start == IPV4_HEADER else VARYING_IPV6).items():
        mask[at] &= ~bits
    for at, bits in (VARYING_TCP if proto == TCP else VARYING_UDP).items():
        mask[start + at] &= ~bits
    return int.from_bytes(mask, "big")


def mergeable(packets, i):
    """How many packets from packets[i] on the kernel may take as one large
    packet (see merge): what its GRO would have merged had they arrived on
    a network card (tcp_gro_receive(), udp_gro_receive() in net/ipv4/).

    They must be of one flow, agree on every header byte a packet of a flow
    may not change (see header_mask), be of the first one's size but a
    shorter last, and be 64 at most and 64 KiB in all; tcp_run() and
    udp_run() add what each protocol needs. Packets are well-formed
    (ip_problem) already; IPv4 ones with options, fragments, and IPv6 ones
    with extension headers are never merged.
    """
    p = packets[i]
    if p[VERSION] == IPV4_NO_OPTIONS:   # IPv4, no options
        if int.from_bytes(p[IPV4_FRAGMENT], "big") & 0xBFFF:
            return 1   # a fragment (more fragments, or an offset; don't-fragment, 0x4000, is fine)
        start, proto = IPV4_HEADER, p[IPV4_PROTOCOL]
    elif p[VERSION] >> 4 == 6:
        start, proto = IPV6_HEADER, p[IPV6_NEXT]
    else:
        return 1
    if len(p) < start + TCP_HEADER:
        return 1
    if proto == TCP:
        return tcp_run(packets, i, start)
    if proto == UDP:
        return udp_run(packets, i, start)
    return 1


def tcp_run(packets, i, t):
    """mergeable() for TCP segments, whose header starts at `t`: they must
    also follow each other in sequence, and carry only ACK, with PSH allowed
    on the last. (The mask compares the rest: acknowledgement, header
    length, window, options with their timestamps.)"""
    p = packets[i]
    end = t + (p[t + TCP_OFFSET] >> 4) * 4   # where the payload starts
    size = len(p) - end   # of every segment but the last
    if p[t + TCP_FLAGS] != ACK or end < t + TCP_HEADER or size <= 0:
        return 1   # a SYN, a FIN, a pure ACK...
    mask = header_mask(t, end, TCP)
    key = int.from_bytes(p[:end], "big") & mask
    at_seq, at_flags = (end - t - TCP_ACK) * 8, (end - t - TCP_FLAGS - 1) * 8   # bits from the right
    seq = int.from_bytes(p[t + TCP_SEQ:t + TCP_ACK], "big") + size
    total, j, n = len(p), i + 1, min(len(packets), i + GSO_MAX_SEGMENTS)
    while j < n:
        q = packets[j]
        more = len(q) - end
        h = int.from_bytes(q[:end], "big")
        if (more <= 0 or more > size or total + more > MAX_PACKET or h & mask != key
                or h >> at_seq & 0xFFFFFFFF != seq & 0xFFFFFFFF):
            break
        seq, total, j = seq + more, total + more, j + 1
        if more < size or h >> at_flags & PSH:
            break   # a short one or a push ends the run
    return j - i


def udp_run(packets, i, u):
    """mergeable() for UDP datagrams, whose header starts at `u`: each
    one's UDP length must agree with its IP length."""
    p = packets[i]
    end = u + UDP_HEADER
    size = len(p) - end
    if int.from_bytes(p[u + UDP_LENGTH:u + UDP_CHECKSUM], "big") != len(p) - u or size <= 0:
        return 1   # the lengths disagree, or an empty datagram
    mask = header_mask(u, end, UDP)
    key = int.from_bytes(p[:end], "big") & mask
    at_length = (UDP_HEADER - UDP_CHECKSUM) * 8   # bits from the right
    total, j, n = len(p), i + 1, min(len(packets), i + GSO_MAX_SEGMENTS)
    while j < n:
        q = packets[j]
        more = len(q) - end
        h = int.from_bytes(q[:end], "big")
        if (more <= 0 or more > size or total + more > MAX_PACKET or h & mask != key
                or h >> at_length & 0xFFFF != more + UDP_HEADER):
            break
        total, j = total + more, j + 1
        if more < size:
            break   # a short one ends the run
    return j - i


def merge(run):
    """The buffers of one write() that hands `run` (see mergeable) to the
    kernel as one packet: a virtio_net_hdr saying "TCP segments (or UDP
    datagrams) of this size", the first one's headers with the total
    length, then every payload. The kernel takes it as if GRO had merged
    it, and cuts it up again (GSO) where it must, each piece with its own
    headers. The checksum is left for the kernel to finish (NEEDS_CSUM): the
    header holds just the sum of the pseudo-header (RFC 9293, 3.1; RFC 768;
    RFC 8200, 8.1), as a network card's driver would leave it.
    """
    first, last = run[0], run[-1]
    v6 = first[VERSION] >> 4 == 6
    h, proto = (IPV6_HEADER, first[IPV6_NEXT]) if v6 else (IPV4_HEADER, first[IPV4_PROTOCOL])
    end = h + (first[h + TCP_OFFSET] >> 4) * 4 if proto == TCP else h + UDP_HEADER
    total = sum(map(len, run)) - end * (len(run) - 1)   # one set of headers, every payload
    ip = bytearray(first[:h])
    if v6:   # no header checksum; a payload length; the pseudo-header's length is 32 bits
        ip[IPV6_LENGTH] = (total - h).to_bytes(2, "big")
        pseudo = first[IPV6_SRC.start:IPV6_DST.stop] + struct.pack("!I3xB", total - h, proto)
    else:
        ip[IPV4_LENGTH] = total.to_bytes(2, "big")
        ip[IPV4_CHECKSUM] = b"\0\0"
        ip[IPV4_CHECKSUM] = internet_checksum(bytes(ip)).to_bytes(2, "big")
        pseudo = first[IPV4_ADDRESSES] + struct.pack("!BBH", 0, proto, total - h)
    pseudo = (~internet_checksum(pseudo) & 0xFFFF).to_bytes(2, "big")   # its sum, not inverted
    header = bytearray(first[h:end])
    if proto == TCP:
        header[TCP_FLAGS] |= last[h + TCP_FLAGS] & PSH
        header[TCP_CHECKSUM:TCP_CHECKSUM + 2] = pseudo
        gso, check_at = (VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4), TCP_CHECKSUM
    else:
        header[UDP_LENGTH:UDP_CHECKSUM] = (total - h).to_bytes(2, "big")
        header[UDP_CHECKSUM:UDP_HEADER] = pseudo
        gso, check_at = VIRTIO_NET_HDR_GSO_UDP_L4, UDP_CHECKSUM
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, end, len(first) - end, h, check_at)
    return [vnet, ip, header] + [q[end:] for q in run]   # (a slice copies, and still costs less than a memoryview)


def flow_of(packet):
    """What tells one flow from another: the addresses, and for TCP and UDP
    the ports too (where they follow the header at once: IPv4 without
    options, IPv6 without extension headers). Other protocols get one flow
    per address pair: a ping's ICMP checksum changes with every packet and
    must not make each one a new flow. The keys of IPv4 (8 or 12 bytes) and
    IPv6 (32 or 36) can never be equal. (Each packet has its version's
    header: from_tun_ok and admit() let no shorter one in.)"""
    if packet[VERSION] == IPV4_NO_OPTIONS:
        return packet[IPV4_FLOW] if packet[IPV4_PROTOCOL] in (TCP, UDP) else packet[IPV4_ADDRESSES]
    if packet[VERSION] >> 4 == 4:
        return packet[IPV4_ADDRESSES]   # options: the ports are further on, and rare enough not to look
    return packet[IPV6_FLOW] if packet[IPV6_NEXT] in (TCP, UDP) else packet[IPV6_ADDRESSES]


class FairQueue:
    """Packets waiting to go on: a FIFO per flow, served round robin, flows
    that just became active first. This is the scheduling half of fq_codel
    (RFC 8290), done in user space, with CAKE's fairness between hosts on
    top. When the tunnel is busy, udptun is the bottleneck, and a backlog
    forms in front of it. Left in the kernel (the TUN device's ring, the
    socket's buffer) it is one FIFO, and a ping or a keystroke waits behind
    the whole of a download: a queue of 5 ms and more through this tunnel.
    So each turn takes in more than it passes on (READ_AHEAD against
    BATCH): the backlog moves here, where a flow that sends now and then
    finds its queue empty, goes to `new`, and is passed on at the next turn.

    The rules are RFC 8290's (section 4), counted in packets rather than
    bytes (our scarce resource is work per packet): a bucket that still
    has packets after its turn of up to QUANTUM goes to the back of `old`;
    so does a bucket from `new` that has none left, which waits there for
    one more round before it is forgotten. A sender cannot stay "new", and
    first, by keeping its queue short. There is no CoDel half: a TCP sender
    sets the size of its own backlog, and the limits only bound it.

    Flows are hashed into a fixed set of FIFOs, as in RFC 8290, so that
    nothing a sender does makes more of them: one who sends each packet
    from a new port fills the same buckets as one who does not. (Python's
    hash of bytes is keyed at random in each process, as fq_codel's is:
    nobody outside can aim at a bucket.) Two flows may then share a bucket;
    pop() still hands out runs of one flow each.

    Fair between flows is not fair between users: a stranger who opens a
    thousand flows would get a thousand shares against a download's one.
    So, as CAKE's host isolation does (tc-cake(8), "dual-srchost"), each
    host has buckets of its own, HOST_BUCKETS of them, and the hosts take
    turns of QUANTUM packets, which its buckets share. For the server, a
    packet's host is the client's tunnel address: its source on the way in
    (`host="src"`), its destination on the way out (`"dst"`). The client's
    queues have one host, itself (`None`), and BUCKETS buckets.

    Over either limit (packets, bytes), the host with most packets queued
    loses them, from the head of its longest buckets first, as
    fq_codel_drop() does for a flow: the one who floods loses, not everyone
    (the kernel counts nothing, so we do, as "queue-full"). From a socket
    that many share (the server's listening socket), each turn reads all it
    may (READ_AHEAD), though the queue is full: what the kernel drops when
    that socket's buffer overflows, it drops whoever sent it, and a
    client's packets must not be lost there for a stranger's. From a
    client's own socket (see OwnSockets), a turn reads only while its hosts
    hold less than their share of the queue (room()): what the rest of a
    flood costs is the kernel's, who drops it at that socket, and ours no
    more.

    However many flows there are, a host has at most HOST_BUCKETS buckets
    (BUCKETS for the client), and the queue at most `limit` packets; a
    host's turn looks at each of its buckets at most once.

    What it brings is time, not speed. With one FIFO per direction instead
    (dropping at its tail when full), in the A/B run (see the chapter's
    top), a ping through the tunnel took 3.2 ms (p50) during a TCP upload
    and 4.2 ms during a download; with the FairQueue 2.0 and 1.6 ms. The
    FIFO moved up to 10% more (TCP up; 64-byte UDP 6%), about this
    machine's noise. And a FIFO would let a stranger's flood take the
    whole queue (see Security in the README).
    """

    def __init__(self, limit=QUEUE_LIMIT, byte_limit=QUEUE_BYTES, quantum=QUANTUM, buckets=None, host=None):
        self.limit, self.byte_limit, self.quantum = limit, byte_limit, quantum
        # (a power of two: a flow's bucket is its hash & mask)
        self.mask = (buckets or (HOST_BUCKETS if host else BUCKETS)) - 1
        self.host = HOST_IN_FLOW.get(host)
        # (host, number) -> [its packets, oldest first; each one's flow; the
        # host]. A bucket is here exactly while it is in its host's `new` or
        # `old` (empty: waiting in `old` to be forgotten).
        self.buckets = {}
        # host -> (new, old): its buckets that were idle when their packet
        # came, and those that have had a turn. A host is here while it has
        # buckets, and then in `turns` too, once.
        self.hosts = {}
        self.turns = deque()
        self.length = self.bytes = 0

    def __len__(self):
        return self.length

    def push(self, packets):
        """Queue packets, in order; return how many had to be dropped."""
        buckets, hosts, mask, last = self.buckets, self.hosts, self.mask, None
        for packet in packets:
            # flow_of(packet), its common cases written out: a call per
            # packet costs more than the rest of this loop
            first = packet[VERSION]
            key = (packet[IPV4_FLOW] if first == IPV4_NO_OPTIONS and packet[IPV4_PROTOCOL] in (TCP, UDP)
                   else packet[IPV6_FLOW] if first >> 4 == 6 and packet[IPV6_NEXT] in (TCP, UDP)
                   else flow_of(packet))
            if key != last:   # (mostly the same flow as the packet before: one lookup per run)
                host = self.host and key[self.host[len(key) > 12]]
                b = (host, hash(key) & mask)
                bucket = buckets.get(b)
                if bucket is None:
                    bucket = buckets[b] = [[], [], host]
                    lists = hosts.get(host)
                    if lists is None:
                        lists = hosts[host] = (deque(), deque())
                        self.turns.append(host)
                    lists[0].append(b)
                queue, flows = bucket[0], bucket[1]
                last = key
            queue.append(packet)
            flows.append(last)
        self.length += len(packets)
        self.bytes += sum(map(len, packets))
        if self.length > self.limit or self.bytes > self.byte_limit:
            return self.shed()
        return 0

    def room(self, hosts):
        """How many more packets hosts `hosts` may queue before they hold
        more than an equal share of the limit, with the others queued now."""
        share = self.limit // max(1, len(self.hosts))
        buckets, held = self.buckets, 0
        for host in hosts:
            for b in chain(*self.hosts.get(host, ())):
                held += len(buckets[b][0])
        return max(0, share - held)

    def shed(self):
        """Drop until well under both limits (an eighth of each: looking
        for whom to drop from takes a look at every bucket, so it is done
        for many packets at once, as fq_codel_drop() does): from the host
        with most packets queued, from the head of its longest buckets
        first."""
        dropped = 0
        limit, byte_limit = self.limit - self.limit // 8, self.byte_limit - self.byte_limit // 8
        load = {}
        for bucket in self.buckets.values():
            load[bucket[2]] = load.get(bucket[2], 0) + len(bucket[0])
        order = sorted(self.buckets.values(), key=lambda b: (-load[b[2]], b[2] or b"", -len(b[0])))
        for bucket in order:   # (one look at every bucket, however many hosts)
            queue, n = bucket[0], 0
            while n < len(queue) and (self.length > limit or self.bytes > byte_limit):
                self.bytes -= len(queue[n])
                self.length -= 1
                n += 1
            del queue[:n], bucket[1][:n]
            dropped += n
            if self.length <= limit and self.bytes <= byte_limit:
                break
        return dropped

    def pop(self, budget, byte_budget=QUEUE_BYTES, run_budget=None):
        """Up to `budget` packets, and about `byte_budget` bytes (the packet
        that reaches it is the last), in at most `run_budget` runs (None: any
        number), in the order to write them: as runs, a list of one flow's
        packets each (what is done per flow, such as finding where its
        packets go, is then done once per run).

        Hosts take turns of QUANTUM packets; in its turn, a host's buckets
        take theirs, its new ones first, each at most once."""
        runs, count, size = [], 0, 0
        buckets, hosts, turns = self.buckets, self.hosts, self.turns
        run_budget = run_budget or budget
        while count < budget and size < byte_budget and len(runs) < run_budget and turns:
            host = turns.popleft()
            new, old = hosts[host]
            share = min(self.quantum, budget - count)
            visits = len(new) + len(old)
            while share and size < byte_budget and len(runs) < run_budget and visits:
                visits -= 1
                from_new = bool(new)
                b = new.popleft() if from_new else old.popleft()
                bucket = buckets[b]
                queue = bucket[0]
                # Up to the host's share, cut where the bytes reach the
                # budget. (Slices and sums, not a step per packet: this
                # runs for every packet of a download. The count binds
                # more often than the bytes: look for where the bytes cut
                # a run only when it reaches the budget.)
                k = min(len(queue), share)
                if k:
                    run = queue[:k]
                    end = size + sum(map(len, run))
                    if end >= byte_budget:
                        ends = list(accumulate(map(len, run), initial=size))   # the size after each packet
                        k = bisect.bisect_left(ends, byte_budget, 1)
                        run, end = run[:k], ends[k]
                    flows = bucket[1][:k]
                    del queue[:k], bucket[1][:k]
                    if flows.count(flows[0]) == k:   # one flow, as nearly always
                        runs.append(run)
                    else:   # flows that share the bucket: a run for each stretch of one flow
                        i = 0
                        for _, stretch in groupby(flows):
                            n = sum(1 for _ in stretch)
                            runs.append(run[i:i + n])
                            i += n
                    share -= k
                    count, size = count + k, end
                if queue or from_new:
                    old.append(b)
                else:
                    del buckets[b]
            if new or old:
                turns.append(host)
            else:
                del hosts[host]
        self.length -= count
        self.bytes -= size
        return runs


class Batching:
    """The speed layer: mixed in before a policy class, as in
    `class FastServer(Batching, Server)`, the way socketserver's
    ThreadingMixIn is. It overrides how the plain loop moves packets
    (queued, handle, tun_to_udp, udp_to_tun, watch_socket), adds its
    figures to status(), and calls the policy's hooks (admit, address_for)
    for each packet, as the plain loop does.

    Python spends microseconds on each system call and each packet, where
    the kernel spends fractions of one; a tunnel in Python is fast only if
    it makes few calls for many packets. So, while a side has a backlog:
    - a turn takes in up to READ_AHEAD packets, and passes on BATCH;
    - one sendmsg() sends a run of equal-sized datagrams (UDP GSO), and
      one recvmsg() can return many, coalesced by the kernel (UDP GRO);
    - one write() hands the TUN device a run of one flow's packets as one
      large packet (see MergingWriter): the kernel's routing, firewall and
      TCP then work once per run instead of once per packet;
    - the backlog waits in a FairQueue per direction, where a ping or a
      keystroke does not wait behind a download.
    A side has a backlog when its queue holds packets, or when it was
    ready at the previous turn too. Otherwise the first packet goes straight
    on, as in the plain loop: an idle tunnel's round trip (ssh, a game, a
    call) waits in no queue. It still costs a little: in the idle
    benchmark (bench_udptun.py's test_bench_idle, ten runs of 20 rounds)
    its p50 was 1.08 to 1.18 times the plain loop's, at 100 and at 5 pings
    a second.

    Without all of it (--plain), in the A/B run (see the chapter's top):
    TCP 0.34 Gbit/s up, 0.50 down, 0.34 with 4 streams, 33 kpps of 64-byte
    UDP, 32.6 CPU s/GB; with it 3.7, 2.6, 3.5 and 2.6 times as much, for
    0.31 times the CPU.

    Hooks: HOSTS, where the queues find whose a packet is, to be fair
    between users (see FairQueue); hosts_of(sock), who sends on a socket,
    to read no more of a host's than its share. Callers: as Forwarder's.
    """
    HOSTS = (None, None)   # on the way to the TUN device, and to the socket: one user, us
    crowded = False        # (the server's clients, see Server.read_clients)

    def hosts_of(self, sock):
        """The hosts (see FairQueue) who alone send on `sock`, or None: anyone may."""
        return None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gso = True            # until the kernel says otherwise
        self.writer = MergingWriter(self.tun, self.drop)
        self.to_tun = FairQueue(host=self.HOSTS[0])  # received from the socket, for the TUN device
        self.to_udp = FairQueue(host=self.HOSTS[1])  # read from the TUN device, for the socket
        self.ready_before = ()     # the descriptors that were read at the previous turn
        self.ready_now = []        # and at this one, so far
        self.longest_turn = 0.0    # seconds: how long a packet may have to wait for the rest of its turn
        self.costliest_turn = 0.0  # seconds of CPU time: the most a busy turn cost
        self.turn_costs = [0] * len(TURN_COSTS)   # how many busy turns cost each of TURN_COSTS

    def watch_socket(self, sock, poller=None):
        enable_gro(sock)
        super().watch_socket(sock, poller)

    def queued(self):
        # (The queues' `length`, not len(), which would call a method of
        # ours: a lone packet's wake-up should run as few steps as it can.)
        return bool(self.to_tun.length or self.to_udp.length)

    def handle(self, events):
        """A turn: take in what has arrived on either side, write a batch to
        the TUN device and read at once what those writes made the kernel
        answer (TCP acknowledgements, echo replies), then send a batch."""
        # What a turn with a backlog costs us, in CPU time: its length in
        # wall-clock time also counts the time others ran meanwhile. (Not
        # measured on a quiet tunnel, where each turn passes on one packet
        # and the clock's two system calls would be much of its cost.)
        busy = self.to_tun.length or self.to_udp.length
        if busy:
            cpu = time.thread_time()
        self.ready_now = []
        super().handle(events)
        self.ready_before = self.ready_now
        if self.to_tun.length:
            self.write_tun(self.to_tun.pop(BATCH, BATCH_BYTES, WRITES))
            self.take_from_tun()
        if self.to_udp.length:
            self.send_udp(self.to_udp.pop(BATCH, BATCH_BYTES))
        self.longest_turn = max(self.longest_turn, time.monotonic() - self.now)
        if busy:
            cpu = time.thread_time() - cpu
            self.costliest_turn = max(self.costliest_turn, cpu)
            self.turn_costs[min(len(TURN_COSTS) - 1, int(cpu * 1000).bit_length())] += 1

    def tun_to_udp(self):
        self.ready_now.append(self.tun.fd)
        if self.to_udp.length or self.tun.fd in self.ready_before:
            self.take_from_tun()
        else:
            super().tun_to_udp()   # one packet, straight on

    def udp_to_tun(self, sock):
        fd = sock.fileno()
        self.ready_now.append(fd)
        # A backlog: in bulk, through the queue. (Crowded: more of the
        # server's clients are ready than a turn reads, each one's socket
        # every few turns only.)
        if self.to_tun.length or fd in self.ready_before or self.crowded:
            hosts = self.hosts_of(sock)
            limit = READ_AHEAD if hosts is None else min(READ_AHEAD, self.to_tun.room(hosts))
            self.enqueue(self.to_tun, self.recv_udp(sock, limit))
            return
        packets = self.recv_udp(sock, 1)   # one receive: a lone datagram goes straight on
        if len(packets) == 1:
            self.write_one(packets[0])
        else:   # (datagrams glued by GRO after all)
            self.enqueue(self.to_tun, packets)

    def take_from_tun(self):
        self.enqueue(self.to_udp, [p for p in self.read_tun(READ_AHEAD) if self.from_tun_ok(p)])

    def enqueue(self, queue, packets):
        refused = queue.push(packets)
        if refused:
            self.drop("queue-full", count=refused)

    def read_tun(self, limit):
        """Up to `limit` packets from the TUN device (without the vnet header)."""
        packets = []
        fd, skip = self.tun.fd, self.tun.skip
        for _ in range(limit):
            try:
                packet = os.read(fd, skip + MAX_PACKET)
            except BlockingIOError:
                break
            packets.append(packet[skip:] if skip else packet)
        return packets

    def recv_udp(self, sock, limit):
        """The packets admit() lets in from what `sock` holds: until
        `limit` datagrams or more have come, or none is left.

        With UDP GRO one receive may return many datagrams from one sender,
        glued together; a control message gives their size (all equal but
        the last), and we cut them apart again. Without GRO, or for a lone
        datagram, there is no control message.

        Without GRO, in the A/B run (see the chapter's top): TCP 1.11 Gbit/s
        up, 1.15 down, 1.11 with 4 streams, 77 kpps, 12.1 CPU s/GB. GRO
        brings 13%, 12%, 6% and 12% more, for 0.85 times the CPU.
        """
        packets, count, admit = [], 0, self.admit
        while count < limit:
            try:
                data, ancillary, _, addr = sock.recvmsg(MAX_PACKET, GRO_CMSG_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EBADF:   # closed by admit() (its owner moved): nothing more to read
                    break
                self.socket_error(e)
                count += 1   # it takes a place in this turn: a flood of them cannot keep us here
                continue
            if ancillary:   # (each judged alone: a forgery glued among a client's datagrams too)
                datagrams = cut_apart(data, ancillary)
                count += len(datagrams)
                packets += [d for d in datagrams if admit(d, addr)]
            else:
                count += 1
                if admit(data, addr):
                    packets.append(data)
        return packets

    def send_udp(self, runs):
        """Send the packets of `runs` (see FairQueue.pop) where address_for
        says, in one batch per address."""
        batches = {}   # address -> packets, in queue order
        address_for = self.address_for
        for run in runs:
            for packet in run:
                addr = address_for(packet)
                if addr is not False:
                    batch = batches.get(addr)
                    if batch is None:
                        batches[addr] = [packet]
                    else:
                        batch.append(packet)
        for addr, batch in batches.items():
            self.send_packets(batch, addr)

    def send_packets(self, packets, addr=None):
        """Send packets to addr (None: the connected peer), batching runs of
        equal size into one sendmsg() with UDP GSO: the kernel cuts the
        buffer into datagrams of that size; a shorter packet may end a run.

        Without GSO, in the A/B run (see the chapter's top): TCP 0.77 Gbit/s
        up, 0.73 down, 0.78 with 4 streams, 53 kpps, 17.5 CPU s/GB. GSO
        brings 61%, 78%, 52% and 64% more, for 0.59 times the CPU."""
        i, n = 0, len(packets)
        while i < n:
            size = len(packets[i])
            j = i + 1
            if self.gso:
                end = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
                while j < end and len(packets[j]) == size:
                    j += 1
                if j < end and len(packets[j]) < size:
                    j += 1
            if j - i == 1:
                self.send_one(packets[i], addr)
            else:
                self.send_gso(packets[i:j], size, addr)
            i = j

    def send_gso(self, batch, size, addr):
        segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        try:
            if addr is None:
                self.sock.sendmsg(batch, segment)
            else:
                self.sock.sendmsg(batch, segment, 0, addr)
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO):   # no UDP GSO here at all
                self.gso = False
                log(f"udptun: UDP GSO unavailable ({e.strerror}): one datagram per packet from now on")
            elif e.errno != errno.EMSGSIZE:   # EMSGSIZE: just this batch was too big
                self.send_failed(e, len(batch))
                return
        for packet in batch:
            self.send_one(packet, addr)

    def write_tun(self, runs):
        for run in runs:
            self.writer.write(run)

    def status(self):
        return dict(super().status(), merged={"packets": self.writer.packets, "writes": self.writer.writes},
                    longest_turn_ms=round(self.longest_turn * 1e3, 2),
                    costliest_turn_ms=round(self.costliest_turn * 1e3, 2),
                    turns_by_cpu_ms=dict(zip(TURN_COSTS, self.turn_costs)))


class MergingWriter:
    """Writes packets to a TUN device, a run of one flow's packets (see
    mergeable) as one large packet. The kernel then does its work (routing,
    the firewall, NAT, the receiving TCP) once per run instead of once per
    packet, and on the server that work is most of the cost.

    A kernel that refuses a merged packet of a protocol (UDP before Linux
    6.2) gets that protocol's packets one by one from then on. `drop` is
    the forwarder's, to count what could not be written.

    Without merged writes (a TUN device without the vnet header), in the
    A/B run (see the chapter's top): TCP 0.77 Gbit/s up, 1.10 down, 0.76
    with 4 streams, 51 kpps, 14.7 CPU s/GB. Merging brings 62%, 17%, 55%
    and 71% more, for 0.70 times the CPU.
    """

    def __init__(self, tun, drop):
        self.fd, self.drop = tun.fd, drop
        self.head = PLAIN_VNET_HDR if tun.vnet else b""
        self.merging = {TCP, UDP} if tun.vnet else set()   # what the kernel takes merged, as far as we know
        self.packets = self.writes = 0   # packets merged, and in how many writes

    def write(self, packets):
        fd, head, merging = self.fd, self.head, self.merging
        i, n = 0, len(packets)
        while i < n:
            packet = packets[i]
            proto = packet[IPV4_PROTOCOL] if packet[VERSION] >> 4 == 4 else packet[IPV6_NEXT]
            run = mergeable(packets, i) if proto in merging else 1   # how many go in this write
            try:
                if run == 1:
                    os.write(fd, head + packet)
                else:
                    os.writev(fd, merge(packets[i:i + run]))
                    self.packets += run
                    self.writes += 1
            except OSError as e:
                if run == 1 or e.errno != errno.EINVAL:
                    self.drop("tun-write", e.strerror, count=run)   # count, never crash
                else:   # not taken here: one write per packet from now on
                    merging.discard(proto)
                    kind = "TCP segments" if proto == TCP else "UDP datagrams"
                    log(f"udptun: the TUN device refused merged {kind} ({e.strerror}): "
                        "one write per packet from now on")
                    continue   # the same packets again, one by one
            i += run


def cut_apart(data, ancillary):
    """The datagrams UDP GRO glued into `data`: all of the size its control
    message gives, but the last."""
    size = 0
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            size = struct.unpack("=i", value[:4])[0]
    if 0 < size < len(data):
        return [data[i:i + size] for i in range(0, len(data), size)]
    return [data]


def enable_gro(sock):
    """Ask for coalesced datagrams (UDP GRO, see Batching.recv_udp). An older
    kernel refuses, and then simply hands us one datagram per receive."""
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)


class FastServer(Batching, Server):
    """The server, with the speed layer."""
    HOSTS = ("src", "dst")   # a client's tunnel address: the source of what it sends, the destination of replies

    def hosts_of(self, sock):
        return self.own_sockets.owned.get(sock.fileno())   # (None: the listening socket)


class FastClient(Batching, Client):
    """The client, with the speed layer."""


# ================ 10. The command line
# What the user types, checked before anything changes; then the server's
# and the client's setup, in order, each change pushed on the undo stack.
def tunnel_addresses(args):
    """This end's tunnel addresses: IPv4, and IPv6 where the machine has it."""
    address = parse_address(args.address, "--address")
    if not ipv6_available():
        log("udptun: IPv6 is off on this machine: the tunnel carries IPv4 only")
        return [address]
    if args.mtu < 1280:   # IPv6's minimum (RFC 8200): below it the kernel takes IPv6 off the device
        log(f"udptun: --mtu {args.mtu} is below IPv6's 1280: the tunnel carries IPv4 only")
        return [address]
    return [address, address6_for(address, args.address6)]


def parse_address(text, what, version=4):
    """'10.0.0.1/24' (or, version 6, 'fd00::1/64') -> an IPv4Interface (or
    IPv6Interface), or a UserError that says what is wrong."""
    kind, example, most = ((ipaddress.IPv4Interface, "10.0.0.1/24", 30) if version == 4 else
                           (ipaddress.IPv6Interface, "fd00::1/64", 126))
    try:
        iface = kind(text)
    except ValueError:
        raise UserError(f"{what} {text!r} is not an IPv{version} address with a prefix, like {example}") from None
    net = iface.network
    if net.prefixlen > most or iface.ip in (net.network_address, net.broadcast_address):
        raise UserError(f"{what} {text}: use a host address in a /{most} or larger subnet, like {example}")
    return iface


def address6_for(address, given):
    """This end's IPv6 tunnel address: --address6 if given, else the host
    number of IPv4 `address` in DEFAULT_SUBNET6."""
    if given:
        return parse_address(given, "--address6", 6)
    net = ipaddress.IPv6Network(DEFAULT_SUBNET6)
    host = int(address.ip) - int(address.network.network_address)
    return ipaddress.IPv6Interface((int(net.network_address) + host, net.prefixlen))


def run_server(args):
    allow = [parse_network(n, "--allow") for n in args.allow]
    reach = [parse_network(n, "--reach") for n in args.reach if not re.fullmatch(PORT_PROTO, n)]
    ports = [parse_port(n) for n in args.reach if re.fullmatch(PORT_PROTO, n)]
    addresses = tunnel_addresses(args)
    with lock_and_recover(args) as changes:
        system = changes.system
        firewall = choose_firewall(args.firewall)
        if args.out_interface and not system.query("ip", "-o", "link", "show", "dev", args.out_interface,
                                                   check=False):
            raise UserError(f"--out-interface {args.out_interface}: no such interface here (see `ip link`)")
        out = {4: args.out_interface or default_interface(system, 4)}
        if len(addresses) > 1:   # IPv6: out of the IPv6 default route's interface, if there is one
            out[6] = args.out_interface or default_interface(system, 6)
        for address in addresses:
            check_subnet_free(system, address.network, args.dev)
        local = local_addresses(system)
        with listen(args.port) as sock:   # before any change: a busy port fails cleanly
            tun = setup_tun(changes, system, args, addresses)
            # Forwarding is turned off again when we stop, unless firewall
            # rules came since (Docker's, say): see forwarding_for_others.
            set_sysctl(changes, "net.ipv4.ip_forward", "1", unless=[tag(tun.name)])
            if out.get(6):
                # Forwarding makes the kernel ignore router advertisements where
                # accept_ra is 1 (ip-sysctl.rst): a VPS that gets its IPv6
                # default route by SLAAC would lose it when its lifetime ends.
                # 2 accepts them even when forwarding. Set before forwarding.
                key = (f"net/ipv6/conf/{out[6]}/accept_ra" if "." in out[6]   # eth0.100: see sysctl_value
                       else f"net.ipv6.conf.{out[6]}.accept_ra")
                with contextlib.suppress(OSError):   # (an interface without IPv6 has no such setting)
                    if sysctl_value(key) == "1":   # (and back to 1 only if forwarding goes off)
                        set_sysctl(changes, key, "2", unless=[tag(tun.name)])
            if len(addresses) > 1:
                # Even without IPv6 on the internet side: the kernel then answers
                # a client's IPv6 packets with ICMPv6 "no route", so its
                # applications fall back to IPv4 at once, instead of waiting.
                set_sysctl(changes, "net.ipv6.conf.all.forwarding", "1", unless=[tag(tun.name)])
            for address in addresses:   # (out[6] is None on a VPS without IPv6: no NAT, no way out)
                add_firewall(changes, firewall, Openings(
                    tun.name, out.get(address.version), address, args.mtu, nat=not args.no_nat,
                    client_to_client=args.client_to_client, ports=ports, connections=args.max_connections,
                    reach=[n for n in reach if n.version == address.version]))
            table = ClientTable(args.client_timeout, args.rebind_after, args.max_clients, args.max_per_host)
            # A socket for each client (see OwnSockets), past the 1,024 open
            # files a process gets by default: --max-clients and 64 to spare,
            # as far as the hard limit allows.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = args.max_clients + 64
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY
                                                            else want, hard))
            kind = Server if args.plain else FastServer
            server = kind(tun, sock, addresses, table, args.client_to_client, allow or None, local, args.verbose)
            log(f"udptun server: {tun.name} {' '.join(map(str, addresses))}, listening on UDP port {args.port}"
                f"{' (IPv4 and IPv6)' if sock.family == socket.AF_INET6 else ''}, forwarding out of {out[4]}"
                + (f" (IPv6: {out[6]})" if out.get(6) and out[6] != out[4] else "")
                + ("" if args.no_nat else " with NAT")
                + ("" if out.get(6) or len(addresses) == 1 else "; no IPv6 default route: clients' IPv6 is refused"))
            forward(server, changes, args)


def run_client(args):
    addresses = tunnel_addresses(args)
    server_tunnel_ip = parse_ip(args.server_tunnel_ip, "--server-tunnel-ip", 4)
    dns = list(dict.fromkeys(parse_ip(a, "--dns") for a in args.dns))   # each once, in order
    # (A local resolver, 127.0.0.1, is fine: its own queries go through the
    # tunnel. So is a cloud's, 169.254.169.253, with the server's --reach.)
    for a in dns:
        if a.is_multicast or a.version == 6 and a.is_link_local:
            raise UserError(f"--dns {a}: no resolver the tunnel can reach (no router forwards IPv6 link-local "
                            "or multicast addresses): give one beyond the VPS, like 192.0.2.53")
    versions = sorted({a.version for a in addresses})
    # Everything by default, IPv6 too, whether the server carries it or not:
    # never around the tunnel (a machine without IPv6 has none to send).
    routes = ([parse_network(r, "--route") for r in args.route]
              or [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")])
    # Queries to a --dns server go through the tunnel, even with --route.
    # A tunnel without IPv6 (--mtu below 1280, IPv6 off for new devices)
    # on a machine whose other interfaces have it: IPv6 fails at once, as
    # with an IPv4-only VPS, and never goes around the tunnel. So do the
    # queries to an IPv6 --dns server, which we leave out.
    for a in [a for a in dns if a.version not in versions]:
        log(f"udptun: warning: --dns {a}: the tunnel carries IPv4 only; not used")
        dns.remove(a)
    if args.dns and not dns:
        raise UserError("--dns: no server the tunnel can carry: give an IPv4 address")
    routes += [ipaddress.ip_network(a) for a in dns if not any(a in r for r in routes if r.version == a.version)]
    blocked = list(dict.fromkeys(r for r in routes if r.version not in versions)) if kernel_has_ipv6() else []
    routes = list(dict.fromkeys(r for r in routes if r.version in versions))
    family = {"4": socket.AF_INET, "6": socket.AF_INET6}.get(args.family, socket.AF_UNSPEC)
    # Undo what a killed run left first: its --dns may be why names do not resolve.
    with lock_and_recover(args) as changes:
        connect_client(args, changes, addresses, server_tunnel_ip, dns, versions, routes, family, blocked)


def connect_client(args, changes, addresses, server_tunnel_ip, dns, versions, routes, family, blocked=()):
    """The client's part after lock_and_recover(): find the server, set up, forward."""
    system = changes.system
    server = resolve(args.server, args.port, family)
    check_server(server[0], addresses)
    name = None if is_address(args.server) else args.server
    for address in addresses:
        check_subnet_free(system, address.network, args.dev)
    strict = strict_reverse_path_filters()
    if strict:
        log(f"udptun: warning: strict reverse-path filtering (rp_filter 1) on {', '.join(strict)} drops the "
            "server's replies there: make it loose, as Debian and Ubuntu do: "
            "sysctl -w net.ipv4.conf.all.rp_filter=2 " + " ".join(f"net.ipv4.conf.{n}.rp_filter=2" for n in strict))
    tunnelled = [*routes, *blocked]   # (blocked: what fails in the tunnel rather than go around it)
    all_versions = sorted({*versions, *(net.version for net in blocked)})
    table = free_table(system, all_versions)
    firewall = kill_switch_firewall(args.firewall)
    # In a dry run, maybe not as root: no mark (it needs CAP_NET_ADMIN), no ICMP.
    with connect_udp(server, None if args.dry_run else table) as sock:
        tun = setup_tun(changes, system, args, addresses)
        resolv_conf = set_dns(changes, tun.name, [str(a) for a in dns]) if dns else None
        routing = Routing(changes, tun.name, table, first_priorities(system, all_versions))
        routing.add(routes, dns, blocked)
        around = routing.around(server[0], tunnelled)
        kill_switch = KillSwitch(changes, firewall, tun.name, table) if firewall else None
        if kill_switch:
            kill_switch.add(tunnelled, dns, [around] if around else [])
        kind = Client if args.plain else FastClient
        client = kind(tun, sock, addresses, server_tunnel_ip, args.keepalive, table, name, family, args.verbose)
        client.routing, client.resolv_conf = routing, resolv_conf
        seen = {server[0]}

        def moved(address):
            if address in seen:   # (a name that goes back and forth between addresses: one rule each)
                return
            seen.add(address)
            try:
                around = routing.around(address, tunnelled)
                if around and kill_switch:
                    kill_switch.let_through(around)
            except UserError as e:   # (the tunnel goes on: only ssh to the VPS goes through it)
                log(f"udptun: warning: {e}")
        client.moved = moved
        log(f"udptun client: {tun.name} {' '.join(map(str, addresses))}, server {as_text(server)}"
            + ("" if dns else "; DNS unchanged (--dns ADDR resolves names through the tunnel)"))
        if not args.dry_run and args.keepalive:
            client.send_keepalive()   # so the server learns our address right away
        try:
            forward(client, changes, args)
        except (Stop, KeyboardInterrupt):   # asked to stop: undo it all
            raise
        except Exception as e:
            # Anything else (the TUN device deleted under us: EBADFD; a bug)
            # ends the run as kill -9 would: the rules and the "unreachable"
            # routes stay, and nothing goes around the tunnel meanwhile.
            changes.keep()
            what = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise UserError(f"the tunnel stopped ({what}); its routes stay, so nothing goes around it: "
                            f"`sudo python3 {sys.argv[0]} down` restores the network, or start the client again") from None
        finally:
            client.sock.close()   # the one in use now: follow_network may have replaced it


def forward(forwarder, changes, args):
    """Publish status, tell systemd we are ready, forward until a signal."""
    if args.dry_run:
        log("# (dry run: here udptun would forward packets until stopped; then it undoes, newest first:)")
        return
    forwarder.status_path = state_path(args.dev, ".status")
    # (mkdir -p: the journal has usually made it already.)
    os.makedirs(os.path.dirname(forwarder.status_path), mode=0o755, exist_ok=True)
    changes.defer(lambda: os.unlink(forwarder.status_path), f"rm {forwarder.status_path}")
    forwarder.publish()
    sd_notify("READY=1")
    try:
        forwarder.run()
    finally:
        sd_notify("STOPPING=1")
        log(f"udptun: stopping; drops {json.dumps(forwarder.drops, sort_keys=True)}")


def run_down(args):
    if os.geteuid() != 0:
        raise UserError(f"must run as root: sudo python3 {sys.argv[0]} down")
    journal = Journal(args.dev)
    try:
        failed = recover(System(), journal, args.dev)
    finally:
        journal.release()
    if failed:
        raise UserError(f"{len(failed)} undo(s) failed (above): fix the cause, then run `down` again")


def run_status(args):
    """Print what a running udptun publishes (no root needed)."""
    path = state_path(args.dev, ".status")
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"no udptun is running on {args.dev} here (nothing in {path})") from None
    if args.json:
        print(json.dumps(s, indent=1))
        return
    age = time.time() - s["time"]
    print(f"udptun {s['role']} on {s['device']}, pid {s['pid']}, status from {age:.1f} s ago"
          + ("" if Journal(args.dev).held() else " (not running: stale)"))
    print(f"{'tunnel ip':<16}{'udp address':<22}{'last seen':>10}{'rx pkts':>10}{'rx bytes':>13}"
          f"{'tx pkts':>10}{'tx bytes':>13}")
    for c in s["clients"]:
        seen = "never" if c["idle"] is None else f"{c['idle'] + age:.1f} s"
        print(f"{c['ip']:<16}{c['udp']:<22}{seen:>10}{c['rx_packets']:>10}{c['rx_bytes']:>13}"
              f"{c['tx_packets']:>10}{c['tx_bytes']:>13}")
    if "sockets" in s:   # (a server's)
        print(f"clients read on a socket of their own: {s['sockets']}")
    print("drops: " + (", ".join(f"{k} {v}" for k, v in s["drops"].items()) or "none"))
    m = s.get("merged")   # (none with --plain)
    if m:
        print(f"packets merged on writing to {s['device']}: {m['packets']} in {m['writes']} writes; "
              f"longest turn {s['longest_turn_ms']} ms ({s.get('costliest_turn_ms')} ms of CPU time at most)")


def parse_ip(text, what, version=None):
    try:
        ip = ipaddress.ip_address(text)
        if version in (None, ip.version):
            return ip
    except ValueError:
        pass
    kind = f"an IPv{version}" if version else "an IP"
    raise UserError(f"{what} {text!r} is not {kind} address, like 192.0.2.53") from None


def check_server(host, addresses):
    """Refuse a server address that no server can have: a group's, or one
    the tunnel's own routes would send into the tunnel. (A loopback address
    is fine, and so is 0.0.0.0, which Linux connects to as loopback: a
    local relay, such as udp2raw, may carry the datagrams.)"""
    ip = host_ip(host)
    inside = [a.network for a in addresses if ip in a.network]
    if inside:
        raise UserError(f"server {ip} is inside the tunnel's own subnet {inside[0]}: give its public address, "
                        "or pick another --address")
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        why = "a multicast address" if ip.is_multicast else "the broadcast address"
        raise UserError(f"server {ip} is {why}: give the address of the machine udptun's server runs on")


def check_interface_name(name, what):
    """A name the kernel takes for an interface (dev_valid_name() in
    net/core/dev.c), checked before it is used in a path or a command.
    Not '%' either: the kernel would take tun%d as a pattern and name the
    device tun0, while our lock, journal and status would say tun%d, and a
    later --dev tun0 could undo this run's changes."""
    if (not name or len(name.encode()) >= IFNAMSIZ or name in (".", "..")
            or any(ch in "/:%" or ch.isspace() for ch in name)):
        raise UserError(f"{what} {name!r}: an interface name has 1 to {IFNAMSIZ - 1} characters, "
                        "none of them '/', ':', '%' or a space")
    return name


# --reach PORT/PROTO: a port of the VPS itself, for its clients.
PORT_PROTO = r"\d+/(tcp|udp)"


def parse_port(text):
    """'53/udp' -> (53, 'udp'), for --reach."""
    port, proto = text.split("/")
    if not 1 <= int(port) <= 65535:
        raise UserError(f"--reach {text}: a port is 1 to 65535, like 53/udp")
    return int(port), proto


def is_address(text):
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(text))
    return False


def parse_network(text, what):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a network, like 192.0.2.0/24 or 2001:db8::/32") from None


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError like any other: one
    line, exit status 1 (argparse's own prints its usage, status 2)."""

    def error(self, message):
        raise UserError(f"{message} (see: python3 {self.prog} --help)")


# What each number on the command line may be: (least, most). Where 0 means
# "off" it is allowed; elsewhere a count or a time must be positive.
LIMITS = {"port": (1, 65535), "mtu": (576, 65535 - OUTER_OVERHEAD),   # 576: RFC 791's least
          "txqueuelen": (1, 1 << 20), "keepalive": (0, 86400), "client_timeout": (1, 86400 * 7),
          "rebind_after": (0.1, 86400 * 7), "max_clients": (1, 1 << 20), "max_per_host": (1, 1 << 20),
          "max_connections": (1, 1 << 24)}


def check_args(args):
    """Every option, checked before anything runs or touches a path."""
    check_interface_name(args.dev, "--dev")
    if getattr(args, "out_interface", None):
        check_interface_name(args.out_interface, "--out-interface")
    for name, (least, most) in LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and not least <= value <= most:   # (NaN fails too)
            raise UserError(f"--{name.replace('_', '-')} {value}: use {least} to {most}")


def parse_args(argv):
    p = Parser(prog="udptun.py", description=__doc__.split("\n\n")[0],
               epilog="No encryption, no authentication: see the README.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, address):
        q.add_argument("--port", type=int, default=DEFAULT_PORT, help="UDP port of the server (5555)")
        q.add_argument("--address", default=address, help=f"tunnel address and prefix ({address})")
        q.add_argument("--address6", help="IPv6 tunnel address and prefix (default: --address's host "
                                          f"number in {DEFAULT_SUBNET6})")
        q.add_argument("--dev", default="tun0", help="TUN device name (tun0)")
        q.add_argument("--mtu", type=int, default=DEFAULT_MTU, help=f"tunnel MTU ({DEFAULT_MTU})")
        q.add_argument("--txqueuelen", type=int, default=1000,
                       help="TUN device's ring in packets (1000)")
        q.add_argument("--dry-run", action="store_true", help="print every command, change nothing")
        q.add_argument("-v", "--verbose", action="store_true",
                       help="log dropped packets (at most 10 lines per 10 s in all)")
        # The plain loop alone, without the speed layer (see Batching): for
        # reading, for testing, and to tell a bug in one from the other.
        q.add_argument("--plain", action="store_true",
                       help="forward one packet at a time, without the speed layer (slower; for reading and testing)")

    s = sub.add_parser("server", help="run the server (on the VPS)")
    common(s, "10.0.0.2/24")
    s.add_argument("--out-interface", help="interface to the internet (default: that of the default route)")
    s.add_argument("--no-nat", action="store_true", help="add no MASQUERADE rule (you route the subnet)")
    s.add_argument("--firewall", choices=("auto", "iptables", "nft"), default="auto",
                   help="firewall tool (auto: iptables if installed, else nft)")
    s.add_argument("--client-to-client", action="store_true", help="let clients reach each other")
    s.add_argument("--client-timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT,
                   help=f"forget a client silent this many seconds ({DEFAULT_CLIENT_TIMEOUT})")
    s.add_argument("--rebind-after", type=float, default=DEFAULT_REBIND_AFTER,
                   help=f"let another outer IP take a tunnel address after its owner is silent "
                        f"this long ({DEFAULT_REBIND_AFTER})")
    s.add_argument("--max-clients", type=int, default=1000, help="most tunnel addresses in use at once (1000)")
    s.add_argument("--max-per-host", type=int, default=DEFAULT_MAX_PER_HOST,
                   help=f"most tunnel addresses one outer IP may hold ({DEFAULT_MAX_PER_HOST}: "
                        f"{DEFAULT_MAX_PER_HOST // 2} dual-stack clients behind one NAT)")
    s.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"most connections one tunnel address may have open through the VPS "
                        f"({DEFAULT_MAX_CONNECTIONS})")
    s.add_argument("--allow", nargs="+", action="extend", default=[], metavar="CIDR",
                   help="outer addresses that may use the server (repeatable; default: any)")
    s.add_argument("--reach", action="append", default=[], metavar="CIDR|PORT/PROTO",
                   help="let clients reach this network too, though it is private, a cloud's metadata "
                        "service, or behind another interface than --out-interface (with NAT there too); "
                        "or PORT/tcp, PORT/udp: this port of the VPS itself (repeatable)")
    s.set_defaults(func=run_server)

    c = sub.add_parser("client", help="run a client (on the laptop)")
    c.add_argument("server", help="the server's address (IPv4 or IPv6) or host name")
    c.add_argument("-4", dest="family", action="store_const", const="4", help="reach the server over IPv4 only")
    c.add_argument("-6", dest="family", action="store_const", const="6", help="reach the server over IPv6 only")
    common(c, "10.0.0.1/24")
    c.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE,
                   help=f"send a keepalive after this many quiet seconds; 0 = never ({DEFAULT_KEEPALIVE})")
    c.add_argument("--route", action="append", default=[], metavar="CIDR",
                   help="a network to send through the tunnel (repeatable; default: everything)")
    c.add_argument("--server-tunnel-ip", default="10.0.0.2", help="the server's tunnel address (10.0.0.2)")
    c.add_argument("--dns", action="append", default=[], metavar="ADDR",
                   help="resolve names through ADDR, through the tunnel, while connected (repeatable)")
    c.add_argument("--firewall", choices=("auto", "iptables", "nft", "none"), default="auto",
                   help="firewall tool for the kill switch (auto: iptables if installed, else nft; "
                        "none: no kill switch)")
    c.set_defaults(func=run_client)

    d = sub.add_parser("down", help="undo what a killed run left behind")
    d.add_argument("--dev", default="tun0", help="TUN device name (tun0)")
    d.set_defaults(func=run_down)

    t = sub.add_parser("status", help="show a running udptun's peers and drop counters")
    t.add_argument("--dev", default="tun0", help="TUN device name (tun0)")
    t.add_argument("--json", action="store_true", help="print the raw status as JSON")
    t.set_defaults(func=run_status)
    # What no subcommand takes is told by the top parser: say so with the
    # help that lists the subcommand's options.
    args, unknown = p.parse_known_args(argv)
    if unknown:
        {"server": s, "client": c, "down": d, "status": t}[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}")
    return args


def on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


def main(argv=None):
    # SIGINT too: a shell starting us in the background sets Ctrl-C to
    # "ignore", and Python would then never raise KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # What we write under /run/udptun is for anyone to read (`status` needs
    # no privileges), whatever umask sudo passed on: 027 or 077 on a
    # hardened machine would make the folders and the status file root's.
    os.umask(0o022)
    try:
        args = parse_args(argv)
        check_args(args)
        args.func(args)
    except UserError as e:
        print(f"udptun: error: {e}", file=sys.stderr)
        return 1
    except (Stop, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
