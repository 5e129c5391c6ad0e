"""Damaged tickets (issue 13: nothing lost, nothing silently wrong): ticket.json records each gated
leaf's sha256 and the counts the verifier reads, load_ticket refuses a mask that disagrees and
every damaged file with one line naming it, and saving follows the umask and cleans up after kills."""
import json
import os
import socket
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking, save_ticket
from slt_jax.mask_coding import golomb_decode, golomb_encode
from slt_jax.models import create_model
from slt_jax.ticket import FORMAT_VERSION, ZOO_INIT_KWARGS, TicketError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_TICKET = os.path.join(ROOT, "tests", "independent_verifier.py")
SPEC = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
        "use_bias": True, "width": 0.1}
META = {"model": SPEC, "input_shape": [8, 8, 1], "seed": 3, "method": "crbg", "preprocessing": {"scale": 1.0 / 16, "mean": [0.3],
                                                                              "std": [0.4]}}
LEAF = "Dense_1/kernel"


def _params():
    model = create_model(SPEC)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), **ZOO_INIT_KWARGS))["params"]


def _masks(structured=False, seed=0):
    """Random binary gates for the zoo MLP, shaped like its params (None where not gated)."""
    rng = np.random.default_rng(seed)
    shapes = masking.gate_shapes(_params(), structured=structured)
    return jax.tree.map(lambda s: rng.random(s.shape) < 0.4, shapes)


def _save(tmp_path, structured=False, coding="packbits", name="ticket"):
    path = str(tmp_path / name)
    save_ticket(path, {**META, "structured": structured}, _masks(structured), coding=coding)
    return path


def _verifier_counts(ticket):
    """Gated weights and sparsity exactly as tests/independent_verifier.py computes them."""
    flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])  # noqa: E731
    frozen = flat(ticket.frozen_params())
    kept = total = 0
    for path, k in ((p, k) for p, k in flat(ticket.mask).items() if k is not None):
        f = np.asarray(frozen[path])
        kept += int(np.broadcast_to(np.asarray(k), f.shape).sum())
        total += f.size
    return total, 1 - kept / total


def _edit_npz(path, edit):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    np.savez(path, **arrays)


def _edit_json(path, edit):
    with open(os.path.join(path, "ticket.json")) as f:
        meta = json.load(f)
    edit(meta)
    with open(os.path.join(path, "ticket.json"), "w") as f:
        json.dump(meta, f)


def _refused(path, *needles, model=None):
    with pytest.raises(TicketError) as err:
        load_ticket(path, model=model)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# 1. The mask is recorded; a mask that disagrees is refused.

@pytest.mark.parametrize("structured", [False, True])
def test_ticket_json_records_the_mask_and_the_counts_the_verifier_reads(structured, tmp_path):
    path = _save(tmp_path, structured)  # as from a user's own loop: no size, no metrics given
    meta = json.load(open(os.path.join(path, "ticket.json")))
    record = meta["mask_integrity"]
    masks = masking.named_leaves(_masks(structured))
    assert meta["format_version"] == FORMAT_VERSION and sorted(record["leaves"]) == sorted(masks)
    for name, m in masks.items():
        assert record["leaves"][name]["shape"] == list(m.shape) and record["leaves"][name]["kept"] == int(m.sum())
        assert len(record["leaves"][name]["sha256"]) == 64
    assert len(record["sha256"]) == 64 and record["gates"] == sum(m.size for m in masks.values())
    gated_weights, sparsity = _verifier_counts(load_ticket(path))
    assert meta["size"]["gated_weights"] == record["gated_weights"] == gated_weights
    assert meta["metrics"]["sparsity"] == record["sparsity"] == pytest.approx(sparsity, abs=1e-12)
    if structured:  # a unit's bias is gated with it: more weights than gates
        assert gated_weights > record["gates"]


class UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


@pytest.mark.parametrize("structured", [False, True])
def test_a_users_module_gets_the_counts_too(structured, tmp_path):
    module = UserNet()
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"]
    policy = masking.DEFAULT_POLICY if structured else r"(kernel|bias)$"
    masks = jax.tree.map(lambda s: np.random.default_rng(1).random(s.shape) < 0.5,
                         masking.gate_shapes(params, policy=policy, structured=structured))
    path = str(tmp_path / "t")
    meta = {"seed": 5, "input_shape": [8, 8, 1], "structured": structured, "method": "crbg"}
    save_ticket(path, meta, masks, **({"model": module} if structured else {}))  # structured: counted on the module
    recorded = json.load(open(os.path.join(path, "ticket.json")))
    counts = _verifier_counts(load_ticket(path, model=module))
    assert recorded["size"]["gated_weights"] == counts[0]
    assert recorded["metrics"]["sparsity"] == pytest.approx(counts[1], abs=1e-12)
    if structured:  # without the module the weights cannot be counted: said, not guessed
        with pytest.warns(UserWarning, match=r"model=module"):
            save_ticket(str(tmp_path / "u"), meta, masks)
        assert "gated_weights" not in json.load(open(tmp_path / "u" / "ticket.json")).get("size", {})
        load_ticket(str(tmp_path / "u"), model=module)


def _truncate(arrays):
    arrays[f"{LEAF}::bits"] = arrays[f"{LEAF}::bits"][:-1]


def _delete(arrays):
    del arrays[f"{LEAF}::bits"], arrays[f"{LEAF}::shape"]


def _invert(arrays):
    arrays[f"{LEAF}::bits"] = ~arrays[f"{LEAF}::bits"]


def _swap(arrays):
    """Moves one kept gate to a dropped place: the same counts and sparsity, another ticket."""
    bits = np.unpackbits(arrays[f"{LEAF}::bits"])[:625]
    i, j = int(np.flatnonzero(bits)[0]), int(np.flatnonzero(~bits.astype(bool))[0])
    bits[i], bits[j] = 0, 1
    arrays[f"{LEAF}::bits"] = np.packbits(bits)


@pytest.mark.parametrize("damage", [_truncate, _delete, _invert, _swap],
                         ids=["truncated", "deleted", "inverted", "swapped"])
def test_a_damaged_mask_is_refused(damage, tmp_path):
    path = _save(tmp_path)
    _edit_npz(os.path.join(path, "mask.npz"), damage)
    _refused(path, "mask.npz", repr(LEAF))


def test_a_damaged_golomb_mask_is_refused(tmp_path):
    path = _save(tmp_path, coding="golomb")

    def recode_swapped(arrays):  # a valid code of another mask with the same counts: only the sha256 tells
        header = json.loads(str(arrays[f"{LEAF}::header"]))
        bits = golomb_decode(arrays[f"{LEAF}::golomb"].tobytes(), header)
        i, j = int(np.flatnonzero(bits)[0]), int(np.flatnonzero(~bits)[0])
        bits[i], bits[j] = False, True
        data, header = golomb_encode(bits)
        arrays[f"{LEAF}::golomb"] = np.frombuffer(data, np.uint8)
        arrays[f"{LEAF}::header"] = np.asarray(json.dumps(header))

    _edit_npz(os.path.join(path, "mask.npz"), recode_swapped)
    _refused(path, "mask.npz", repr(LEAF), "sha256")


def test_the_verifier_fails_on_a_damaged_ticket_that_keeps_its_counts(tmp_path):
    path = _save(tmp_path)
    _edit_npz(os.path.join(path, "mask.npz"), _swap)
    data = str(tmp_path / "data.npz")
    rng = np.random.default_rng(0)
    np.savez(data, x_val=rng.integers(0, 17, (40, 8, 8, 1)).astype(np.uint8), y_val=rng.integers(0, 10, 40))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, VERIFY_TICKET, path, data, "--x", "x_val", "--y", "y_val"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout
    assert "TicketError" in out.stderr and LEAF in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_a_format_1_ticket_still_loads_and_format_2_needs_its_record(tmp_path):
    path = _save(tmp_path)
    expected = masking.named_leaves(load_ticket(path).gate_masks)

    def to_v1(meta):
        meta["format_version"] = 1
        meta.pop("mask_integrity", None)

    _edit_json(path, to_v1)
    loaded = masking.named_leaves(load_ticket(path).gate_masks)
    for name, m in expected.items():
        np.testing.assert_array_equal(loaded[name], m)
    _edit_json(path, lambda meta: meta.update(format_version=2))
    _refused(path, "ticket.json", "mask_integrity")


# 2. Damaged files: one line naming the file (and leaf), never a KeyError/IndexError/MemoryError.

def _npz(edit):
    return lambda path: _edit_npz(os.path.join(path, "mask.npz"), edit)


def _header(change):
    def edit(arrays):
        header = json.loads(str(arrays[f"{LEAF}::header"]))
        change(header)
        arrays[f"{LEAF}::header"] = np.asarray(json.dumps(header))
    return _npz(edit)


def _write(name, content):
    def edit(path):
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return edit


def _truncate_file(name):
    def edit(path):
        full = os.path.join(path, name)
        data = open(full, "rb").read()
        open(full, "wb").write(data[: len(data) // 2])
    return edit


def _to_v1(path):
    _edit_json(path, lambda m: (m.update(format_version=1), m.pop("mask_integrity", None)))


def _lying_npy_header(path):
    """A member whose .npy header claims 10^15 bytes: refused before numpy allocates them."""
    full = os.path.join(path, "mask.npz")
    with zipfile.ZipFile(full) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    key = f"{LEAF}::bits.npy"
    body = members[key]
    header_len = int.from_bytes(body[8:10], "little")
    header = body[10:10 + header_len].decode("latin1")
    fake = header.replace("(79,)", "(1000000000000000,)")  # 625 gates: 79 bytes
    assert fake != header
    fake = fake.rstrip().ljust(header_len - 1) + "\n"
    members[key] = body[:10] + fake.encode("latin1") + body[10 + header_len:]
    with zipfile.ZipFile(full, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


DAMAGE = {  # id: (coding, damage, words the message must hold)
    "missing shape key": ("packbits", _npz(lambda a: a.pop(f"{LEAF}::shape")), ("mask.npz", LEAF, "::shape")),
    "missing golomb header": ("golomb", _npz(lambda a: a.pop(f"{LEAF}::header")), ("mask.npz", LEAF, "::header")),
    "bits without shape or code": ("packbits", _npz(lambda a: a.pop(f"{LEAF}::bits")), ("mask.npz", LEAF)),
    "unknown key": ("packbits", _npz(lambda a: a.__setitem__("stray", np.zeros(3))), ("mask.npz", "stray")),
    "bad JSON": ("packbits", _write("ticket.json", b'{"seed": 3, "input_shape": [8, 8'), ("ticket.json", "JSON")),
    "JSON not an object": ("packbits", _write("ticket.json", b"[1, 2]"), ("ticket.json",)),
    "golomb count too high": ("golomb", _header(lambda h: h.update(count=h["count"] + 1)), ("mask.npz", LEAF)),
    "golomb count too low": ("golomb", _header(lambda h: h.update(count=h["count"] - 1)), ("mask.npz", LEAF)),
    "golomb m wrong": ("golomb", _header(lambda h: h.update(m=h["m"] + 1)), ("mask.npz", LEAF)),
    "golomb nbits past data": ("golomb", _header(lambda h: h.update(nbits=h["nbits"] * 9)),
                               ("mask.npz", LEAF, "nbits")),
    "golomb header not JSON": ("golomb", _npz(lambda a: a.__setitem__(f"{LEAF}::header", np.asarray("{n: 1"))),
                               ("mask.npz", LEAF)),
    "golomb header lacks a key": ("golomb", _header(lambda h: h.pop("rare")), ("mask.npz", LEAF, "rare")),
    "shape of 10^15 gates": ("packbits", _npz(lambda a: a.__setitem__(f"{LEAF}::shape", np.asarray([10 ** 15]))),
                             ("mask.npz", LEAF, "1000000000000000")),
    "shape of 10^15 gates, golomb, format 1": (
        "golomb", lambda p: (_to_v1(p), _header(lambda h: h.update(n=10 ** 15, count=0, nbits=0))(p),
                             _npz(lambda a: (a.__setitem__(f"{LEAF}::shape", np.asarray([10 ** 15])),
                                             a.__setitem__(f"{LEAF}::golomb", np.zeros(0, np.uint8))))(p)),
        ("mask.npz", LEAF, "does not fit")),
    "shape of 10^15 gates, packbits, format 1": (
        "packbits", lambda p: (_to_v1(p),
                               _npz(lambda a: a.__setitem__(f"{LEAF}::shape", np.asarray([10 ** 5, 10 ** 10])))(p)),
        ("mask.npz", LEAF)),
    "negative shape": ("packbits", _npz(lambda a: a.__setitem__(f"{LEAF}::shape", np.asarray([-25, -25]))),
                       ("mask.npz", LEAF)),
    "npy header claims 10^15 bytes": ("packbits", _lying_npy_header, ("mask.npz", "claims")),
    "mask.npz missing": ("packbits", lambda p: os.remove(os.path.join(p, "mask.npz")), ("mask.npz", "missing")),
    "mask.npz not a zip": ("packbits", _write("mask.npz", b"not a zip at all\n" * 10), ("mask.npz", "not an .npz")),
    "mask.npz truncated": ("packbits", _truncate_file("mask.npz"), ("mask.npz",)),
    "format_version unknown": ("packbits", lambda p: _edit_json(p, lambda m: m.update(format_version=99)),
                               ("ticket.json", "format_version")),
    "seed missing": ("packbits", lambda p: _edit_json(p, lambda m: m.pop("seed")), ("ticket.json", "seed")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_is_one_line_naming_it(case, tmp_path):
    coding, damage, needles = DAMAGE[case]
    path = _save(tmp_path, coding=coding)
    load_ticket(path)
    damage(path)
    _refused(path, *needles)


class BNNet(nn.Module):
    """A user's module with running statistics (stored in state.npz)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(nn.BatchNorm(use_running_average=not train)(x))


@pytest.mark.parametrize("case", ["fits", "wrong shape", "missing key", "extra key", "values changed", "not a zip"])
def test_a_state_npz_that_does_not_fit_is_refused(case, tmp_path):
    module = BNNet()
    variables = jax.device_get(module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    masks = jax.tree.map(lambda s: np.ones(s.shape, bool), masking.gate_shapes(variables["params"]))
    state = {"batch_stats": jax.tree.map(lambda v: np.asarray(v) + 1, variables["batch_stats"])}
    path = str(tmp_path / "t")
    save_ticket(path, {"seed": 0, "input_shape": [8, 8, 1], "init_kwargs": {"train": False}}, masks, state,
                method="crbg")
    if case == "fits":
        ticket = load_ticket(path, model=module)
        np.testing.assert_array_equal(ticket.model_state()["batch_stats"]["BatchNorm_0"]["mean"],
                                      state["batch_stats"]["BatchNorm_0"]["mean"])
        return
    if case == "not a zip":
        _write("state.npz", b"garbage")(path)
    else:
        def edit(arrays):
            key = "batch_stats/BatchNorm_0/mean"
            if case == "wrong shape":
                arrays[key] = np.zeros(7, np.float32)
            elif case == "missing key":
                del arrays[key]
            elif case == "extra key":
                arrays["batch_stats/Other/mean"] = np.zeros(6, np.float32)
            else:
                arrays[key] = arrays[key] * 2
        _edit_npz(os.path.join(path, "state.npz"), edit)
    _refused(path, "state.npz", model=module)


# 3. Saving: the umask, stale temporary directories, a leftover .old, a failed save.

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_ticket_directory_follows_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        path = _save(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporary_directories_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [".ticket-tmp-k1ll3d_x", f".ticket-tmp-{dead.pid}-0123abcd-{host}"]
    kept = [f".ticket-tmp-{os.getpid()}-0123abcd-{host}",  # a save in progress (this process is alive)
            f".ticket-tmp-{dead.pid}-0123abcd-another-host.example",  # another host's: cannot be asked
            "keep-me", ".ticket-tmp", "ticket-tmp-x"]
    for name in stale + kept:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "mask.npz").write_bytes(b"half")
    (tmp_path / ".ticket-tmp-a-file").write_bytes(b"x")
    os.makedirs(tmp_path / "outside")
    (tmp_path / "outside" / "precious").write_bytes(b"y")
    os.symlink(tmp_path / "outside", tmp_path / ".ticket-tmp-link")
    kept += [".ticket-tmp-a-file", ".ticket-tmp-link", "outside"]
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["ticket"])
    assert (tmp_path / "outside" / "precious").read_bytes() == b"y"
    assert (tmp_path / "keep-me" / "mask.npz").read_bytes() == b"half"


def test_a_leftover_old_directory_does_not_block_the_next_save(tmp_path):
    path = _save(tmp_path)
    os.makedirs(path + ".old")
    (tmp_path / "ticket.old" / "ticket.json").write_text("{}")  # a save killed before it removed .old
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ticket"]
    load_ticket(path)


def test_a_failed_save_leaves_the_old_ticket_and_no_temporary_directory(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(TypeError):
        save_ticket(path, {**META, "note": object()}, _masks())  # ticket.json cannot be written
    assert sorted(os.listdir(tmp_path)) == ["ticket"]
    load_ticket(path)
