"""Several hosts commit one generation together (apollo_sync.group): two consumer
processes over loopback gloo, each writing its own shards of one model directory."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import apollo_sync
from apollo_sync import journal as gens
from apollo_sync._core import FAULTS
from apollo_sync.errors import HandlesError, RefusedError
from apollo_sync.group import Group, GroupError, read_group
from apollo_sync.reshard import reshard
from apollo_sync.status import group_status
from conftest import randn

needs_faults = pytest.mark.skipif(not FAULTS, reason="needs the core's `faults` feature")

LAYERS = 4
#: Host 0 holds layers 0-1 and the embedding, host 1 layers 2-3, the norm and the head.
STAGES = [range(0, 2), range(2, 4)]


def names_of(host: int) -> list[str]:
    mine = [f"model.layers.{i}.mlp.down_proj.weight" for i in STAGES[host]]
    mine += [f"model.layers.{i}.input_layernorm.weight" for i in STAGES[host]]
    return (
        ["model.embed_tokens.weight"] if host == 0 else ["model.norm.weight", "lm_head.weight"]
    ) + mine


def base(rows: int = 64) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(rows, 256, seed=100)}
    for i in range(LAYERS):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
        t[f"model.layers.{i}.mlp.down_proj.weight"] = randn(rows * 4, 256, seed=i)
    t["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    t["lm_head.weight"] = randn(rows, 256, seed=101)
    return t


def write_split(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """One shard per host (as `reshard` leaves them), with the index."""
    root.mkdir(parents=True)
    weight_map = {}
    for h in range(2):
        fname = f"model-0000{h + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names_of(h)}, str(root / fname))
        weight_map |= dict.fromkeys(names_of(h), fname)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def step(t: dict[str, torch.Tensor], seed: int, hosts: tuple[int, ...] = (0, 1)) -> None:
    """A training-like change of the tensors of ``hosts``: a few elements each."""
    g = torch.Generator().manual_seed(seed)
    for h in hosts:
        for n in names_of(h):
            flat = t[n].view(-1)
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=g)
            flat[idx] += 0.5


def shards_digest(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.safetensors"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CHILD = """
import json, sys
from safetensors.torch import load_file
import apollo_sync
from apollo_sync.group import Group
root, rank, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
names = json.loads(sys.argv[5])
group = Group(rank, size, f"tcp://127.0.0.1:{port}", timeout=20)
lives = [{n: t for n, t in load_file(p).items() if n in names} for p in sys.argv[6:]]
group.connect()
print("ready", flush=True)
for live in lives:
    r = apollo_sync.sync(root, live, group=group)
    print(json.dumps({"generation": r.generation, "changed": r.total_changed}), flush=True)
"""


def spawn(
    root: Path,
    port: int,
    rank: int,
    lives: list[Path],
    *,
    size: int = 2,
    names: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(root),
            str(rank),
            str(size),
            str(port),
            json.dumps(names_of(rank) if names is None else names),
            *map(str, lives),
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_pair(
    root: Path, lives: list[Path], env: dict[int, dict[str, str]] | None = None, **kw: object
) -> list[tuple[int, str, str]]:
    port = free_port()
    children = [spawn(root, port, h, lives, env=(env or {}).get(h), **kw) for h in range(2)]  # type: ignore[arg-type]
    out = []
    for c in children:
        o, e = c.communicate(timeout=90)
        out.append((c.returncode, o, e))
    return out


def save_live(path: Path, t: dict[str, torch.Tensor]) -> Path:
    save_file({n: v.clone() for n, v in t.items()}, str(path))
    return path


def test_two_hosts_commit_each_generation_together(tmp_path: Path) -> None:
    live = base()
    root = write_split(tmp_path / "model", live)
    lives, truths = [], []
    for i, hosts in enumerate([(0, 1), (0,), (1,), (0, 1)]):  # a host may change nothing
        step(live, seed=i, hosts=hosts)
        lives.append(save_live(tmp_path / f"live{i}.safetensors", live))
        truths.append(shards_digest(write_split(tmp_path / f"truth{i}", live)))
    lives.append(lives[-1])  # and nothing changes anywhere: no generation
    t0 = time.monotonic()
    results = run_pair(root, lives)
    for rc, _, err in results:
        assert rc == 0, err
    per_host = [[json.loads(line) for line in out.splitlines()[1:]] for _, out, _ in results]
    assert [r["generation"] for r in per_host[0]] == [1, 2, 3, 4, None]
    assert [r["generation"] for r in per_host[1]] == [1, 2, 3, 4, None]
    assert per_host[1][1]["changed"] == 0 and per_host[0][2]["changed"] == 0
    assert shards_digest(root) == truths[-1]  # byte for byte, both hosts' files
    g = read_group(root)
    assert g is not None and g.committed == 4 and g.hosts == 2
    assert g.owners == {
        "model-00001-of-00002.safetensors": 0,
        "model-00002-of-00002.safetensors": 1,
    }
    h = apollo_sync.history(root)
    assert h.generation == 4 and [x.number for x in h] == [1, 2, 3, 4]
    assert h[2].files == ["model-00001-of-00002.safetensors"]
    for host in range(2):
        assert gens.load_state(gens.Layout(root, host)).generation == 4
    with apollo_sync.reading(root) as view:
        assert view.generation == 4
    # status: the group's commit point, then each host's part
    gs = group_status(root, look_for_producer=False)
    assert gs.committed == 4 and [h.generation for h in gs.hosts] == [4, 4]
    assert all(not h.awaiting_recovery and not h.not_durable for h in gs.hosts)
    assert gs.hosts[1].model_bytes == (root / "model-00002-of-00002.safetensors").stat().st_size
    shown = subprocess.run(
        [sys.executable, "-m", "apollo_sync", "status", "--model-dir", str(root)],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert "group committed  generation 4" in shown.stdout
    assert "host 1: model-00002-of-00002.safetensors" in shown.stdout
    # refused on a group's directory, changing nothing: a single-host sync, a
    # group of another size, a rollback
    before = shards_digest(root)
    with pytest.raises(GroupError, match="a single-host sync would write without them"):
        apollo_sync.sync(root, load_file(lives[0]))
    one = Group(0, 1, f"tcp://127.0.0.1:{free_port()}", timeout=10)
    with pytest.raises(GroupError, match="group file says 2 host"):
        apollo_sync.sync(
            root, {n: t for n, t in load_file(lives[0]).items() if n in names_of(0)}, group=one
        )
    with pytest.raises(GroupError, match="cannot roll back"):
        apollo_sync.rollback(root, 1)
    assert shards_digest(root) == before and apollo_sync.history(root).generation == 4
    print(f"5 group syncs of 2 hosts: {time.monotonic() - t0:.2f} s with the process start")


@pytest.fixture(scope="module")
def committed_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, dict[str, bytes], dict[str, bytes]]:
    """A directory at group generation 1 ("old"), and the live tensors of a
    generation 2 that changes both hosts' files ("new")."""
    tmp = tmp_path_factory.mktemp("group")
    live = base(rows=512)
    root = write_split(tmp / "template", live)
    step(live, seed=1)
    first = save_live(tmp / "live1.safetensors", live)
    assert all(rc == 0 for rc, _, _ in run_pair(root, [first]))
    old = shards_digest(root)
    step(live, seed=2)
    second = save_live(tmp / "live2.safetensors", live)
    new = shards_digest(write_split(tmp / "truth", live))
    return root, second, old, new


def check_recovered(root: Path, old: dict[str, bytes], new: dict[str, bytes]) -> str:
    """Recovers; asserts every shard holds the old generation or every shard the
    new one, the new one exactly when the group committed it."""
    apollo_sync.recover(root)
    got = shards_digest(root)
    g = read_group(root)
    assert g is not None
    assert got in (old, new), "a mix of two generations"
    assert (got == new) == (g.committed == 2)
    for host in range(2):  # each host's namespace agrees with the group
        layout = gens.Layout(root, host)
        assert gens.load_state(layout).generation == g.committed
        assert max(layout.logs(), default=0) <= g.committed
    assert apollo_sync.history(root).checkpoint == g.committed
    return "new" if got == new else "old"


#: (host killed, where, which generation recovery must leave)
KILLS = [
    (1, "write:1", "old"),  # its records durable, some bytes written in place
    (1, "committed:1", "old"),  # its own commit record durable (state.json not), the group's not
    (0, "prepared:1", "old"),  # host 1 prepared too, and cannot know: recovery decides
    (0, "group-file:1", "old"),  # the group file written, not renamed
    (0, "group-committed:1", "new"),
    (1, "flush:1", "new"),  # after the group commit, in the background flush
]


@needs_faults
@pytest.mark.parametrize(("victim", "point", "expect"), KILLS)
def test_a_host_killed_around_the_commit_leaves_one_generation_everywhere(
    committed_pair: tuple[Path, Path, dict[str, bytes], dict[str, bytes]],
    tmp_path: Path,
    victim: int,
    point: str,
    expect: str,
) -> None:
    template, second, old, new = committed_pair
    root = tmp_path / "model"
    shutil.copytree(template, root)
    results = run_pair(root, [second], env={victim: {"APOLLO_SYNC_CRASH_AT": point}})
    assert results[victim][0] == -signal.SIGKILL, results[victim][2]
    survivor = results[1 - victim]
    if expect == "old":
        assert survivor[0] != 0 and "GroupError" in survivor[2], survivor[2]
    else:
        assert survivor[0] == 0, survivor[2]
    if point != "prepared:1":
        assert check_recovered(root, old, new) == expect
        return
    # left to the next group sync: it recovers first (host 1's prepared part
    # rolled back, as the group file says), then completes the job
    assert shards_digest(root) != old and read_group(root).committed == 1  # type: ignore[union-attr]
    # both hosts prepared 2, the group did not commit it: status says it awaits recovery
    hosts = group_status(root, look_for_producer=False).hosts
    assert [(h.generation, h.awaiting_recovery) for h in hosts] == [(1, [2]), (1, [2])]
    assert all(rc == 0 for rc, _, _ in run_pair(root, [second]))
    assert shards_digest(root) == new and apollo_sync.history(root).generation == 2


def test_kills_of_either_host_at_random_instants_never_leave_a_mix(
    committed_pair: tuple[Path, Path, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    template, second, old, new = committed_pair
    rng = random.Random(13)
    seen = {"old": 0, "new": 0}
    for trial in range(3):
        root = tmp_path / f"run{trial}"
        shutil.copytree(template, root)
        port = free_port()
        children = [spawn(root, port, h, [second]) for h in range(2)]
        for c in children:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.08))
        children[trial % 2].send_signal(signal.SIGKILL)
        for c in children:
            c.communicate(timeout=60)
        seen[check_recovered(root, old, new)] += 1
    print(f"random kills: {seen}")


def test_refusals_change_nothing(tmp_path: Path) -> None:
    live = base()
    # a stage boundary inside a shard: layer 2 shares a file with layers 0-1
    root = tmp_path / "shared"
    root.mkdir()
    save_file({n: live[n] for n in names_of(0) + names_of(1)[:3]}, str(root / "a.safetensors"))
    save_file({n: live[n] for n in names_of(1)[3:]}, str(root / "b.safetensors"))
    before = shards_digest(root)
    step(live, seed=3)
    path = save_live(tmp_path / "live.safetensors", live)
    results = run_pair(root, [path])
    for rc, _, err in results:
        assert rc != 0 and "RefusedError" in err and "a.safetensors: hosts 0, 1" in err, err
        assert "apollo-sync reshard" in err and "--stages 0-1,2-3" in err, err
    assert shards_digest(root) == before and not (root / ".apollo_sync" / "group.json").exists()
    # the fix: re-split at the stage boundaries (the tensors and their bytes kept)
    tensors_before = {n: t for p in root.glob("*.safetensors") for n, t in load_file(p).items()}
    owners = reshard(root, [range(0, 2), range(2, 4)])
    assert owners == {"a-host0.safetensors": 0, "a-host1.safetensors": 1, "b.safetensors": 1}
    md = apollo_sync.ModelDir.open(root)  # the index names the new files
    for name, t in md.tensors.items():
        assert owners[Path(md.headers[t.shard].path).name] == (0 if name in names_of(0) else 1)
    after = {n: t for p in root.glob("*.safetensors") for n, t in load_file(p).items()}
    assert after.keys() == tensors_before.keys()
    assert all(torch.equal(after[n], tensors_before[n]) for n in after)
    # (test_two_hosts_commit_each_generation_together syncs such a directory)


def test_mismatched_group_sizes_are_refused(tmp_path: Path) -> None:
    live = base()
    root = write_split(tmp_path / "model", live)
    before = shards_digest(root)
    path = save_live(tmp_path / "live.safetensors", live)
    port = free_port()
    a = spawn(root, port, 0, [path], size=2)
    b = spawn(root, port, 1, [path], size=3)
    for c in (a, b):
        _, err = c.communicate(timeout=60)
        assert c.returncode != 0 and "every host needs the same --group-size" in err, err
    assert shards_digest(root) == before and not (root / ".apollo_sync").exists()


def test_a_host_opens_the_complete_ranks_of_its_stages_only(tmp_path: Path) -> None:
    from apollo_sync.ranks import open_handles
    from test_tp import CONFIGS, make_model, serve

    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, tp=2, pp=2)  # 0, 1: stage 0; 2, 3: stage 1
    rank = [handles, *(handles.with_name(f"handles.pt.rank{n}") for n in (1, 2, 3))]
    with open_handles(rank[2:], stages=True) as mine:  # host 1: stage 1's two ranks
        assert mine.metadata["rank_set"] == 2
        assert any(".layers.1." in n for n in mine.tensors)
        assert not any(".layers.0." in n for n in mine.tensors)
    with pytest.raises(RefusedError, match="pipeline stage 0 is split between hosts"):
        open_handles(rank[1:], stages=True)  # one tensor-parallel rank of stage 0
    with pytest.raises(HandlesError, match=r"lacks rank\(s\) 0, 1 of 4"):
        open_handles(rank[2:])  # a single host's consumer wants the whole set
    for p in rank[:2]:  # on host 1 only its own ranks' files exist: found from any of them
        p.unlink()
    with open_handles(rank[3], stages=True) as mine:
        assert mine.metadata["rank_set"] == 2
    del ranks  # held to here: their shared memory is what the handles map
