"""The cluster's "hosts": one network namespace each, joined by a veth pair to a bridge in the root
namespace. The shared services (Postgres, Redis, the fake upstream and webhook receiver, the
balancer) listen on the bridge's address, so every host reaches them over its own interface, as
separate machines would over a LAN. Each host's processes also get a UTS namespace of their own, so
the hostname they log and record (a worker's name, a heartbeat) is the host's.

Names carry the subnet's number, so two runs (a CI test and a run by hand) never share anything."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "igc"  # every namespace, bridge and veth this module makes starts with it


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def require_root_and_ip() -> None:
    """The cluster needs `ip netns` and root: say so in one line when either is missing."""
    if os.geteuid() != 0:
        raise NetworkError("scripts/cluster must run as root (it creates network namespaces with `ip netns`)")
    if not shutil.which("ip") or not shutil.which("unshare"):
        raise NetworkError("scripts/cluster needs `ip` (iproute2) and `unshare` (util-linux)")


def _used_networks() -> list[ipaddress.IPv4Network]:
    found = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines():
        found.append(ipaddress.ip_interface(line.split()[3]).network)
    return found


def pick_subnet() -> int:
    """A free 10.213.N.0/24 (N also names this run's namespaces)."""
    used = _used_networks()
    candidates = list(range(1, 250))
    random.shuffle(candidates)
    for number in candidates:
        network = ipaddress.ip_network(f"10.213.{number}.0/24")
        if not any(network.overlaps(other) for other in used) and not ip("netns", "list").stdout.count(
            f"{PREFIX}{number}-"
        ):
            return number
    raise NetworkError("no free 10.213.N.0/24 subnet for the cluster's bridge")


@dataclass
class Host:
    name: str  # api1, worker2, sweeper ...
    namespace: str
    veth: str  # the root-side end; the namespace's end is called eth0
    address: str
    up: bool = True

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host: its network namespace, and its own hostname."""
        return [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv,
        ]  # fmt: skip

    def pids(self) -> list[int]:
        return [int(pid) for pid in ip("netns", "pids", self.namespace, check=False).stdout.split()]

    def kill(self) -> int:
        """The host lost: its interface down first (nothing it had open gets a FIN or a reset out),
        then SIGKILL to every process in it. Returns how many processes were killed."""
        self.interface(False)
        killed = 0
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def interface(self, up: bool) -> None:
        state = "up" if up else "down"
        ip("-n", self.namespace, "link", "set", "eth0", state, check=False)
        ip("link", "set", self.veth, state, check=False)
        self.up = up


@dataclass
class Network:
    number: int = field(default_factory=pick_subnet)
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge = f"{PREFIX}{self.number}br"
        self.gateway = f"10.213.{self.number}.1"  # the bridge: where the shared services listen
        self.cidr = f"10.213.{self.number}.0/24"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str, index: int) -> Host:
        """A namespace with lo and eth0 (10.213.N.index), its veth peer on the bridge."""
        host = Host(name, f"{PREFIX}{self.number}-{name}", f"{PREFIX}{self.number}-{name}"[:15],
                    f"10.213.{self.number}.{index}")  # fmt: skip
        if host.namespace in ip("netns", "list").stdout.split():
            self.remove_host(host)
        inside = f"{PREFIX}{self.number}x{index}"
        ip("netns", "add", host.namespace)
        self.hosts[name] = host
        ip("link", "add", host.veth, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.namespace)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("-n", host.namespace, "link", "set", inside, "name", "eth0")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        return host

    def remove_host(self, host: Host) -> None:
        for pid in host.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("link", "del", host.veth, check=False)
        ip("netns", "del", host.namespace, check=False)
        self.hosts.pop(host.name, None)

    def rebuild(self, name: str) -> Host:
        """A lost host replaced by a new machine at the same address."""
        old = self.hosts[name]
        index = int(old.address.rsplit(".", 1)[1])
        self.remove_host(old)
        time.sleep(0.2)  # the kernel frees the namespace's veth asynchronously
        return self.add_host(name, index)

    def close(self) -> None:
        for host in list(self.hosts.values()):
            self.remove_host(host)
        ip("link", "del", self.bridge, check=False)


def remove_leftovers() -> list[str]:
    """Namespaces and bridges of earlier runs that could not clean up (a SIGKILLed scripts/cluster)."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and name[len(PREFIX) : len(PREFIX) + 1].isdigit():
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and name.endswith("br"):
            ip("link", "del", name, check=False)
            removed.append(name)
    return removed
