"""A pod out of its Service's rotation closes keep-alive connections after each response, so
clients reconnect through the Service (runtime/server/rotation.py): told by the operator
(``POST /admin/rotation``) or read from its labels file, the newer word winning."""

import shutil
import tempfile
import time
from pathlib import Path

import httpx
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from server_harness import running_server

from berth import wire
from berth.runtime.engine import EngineConfig
from berth.runtime.server.rotation import LABELS_FILE, READ_EVERY_S, Rotation


def write_labels(pod_info: Path, routed: str) -> None:
    """As the kubelet writes the downward API's labels file."""
    text = f'app.kubernetes.io/name="berth-runtime"\n{wire.LABEL_ROUTED}="{routed}"\n'
    (pod_info / LABELS_FILE).write_text(text)


def test_the_label_is_read_at_most_once_a_second(tmp_path: Path) -> None:
    clock = [100.0]
    rotation = Rotation(tmp_path, clock=lambda: clock[0])
    assert not rotation.out()  # no file: not under the operator, routed
    write_labels(tmp_path, "false")
    assert not rotation.out()  # within the second
    clock[0] += READ_EVERY_S
    assert rotation.out()
    write_labels(tmp_path, "true")
    clock[0] += READ_EVERY_S
    assert not rotation.out()
    (tmp_path / LABELS_FILE).write_text('other="x"\n')  # no label at all: routed
    clock[0] += READ_EVERY_S
    assert not rotation.out()


def test_the_operator_s_word_holds_until_the_labels_file_changes_after_it(tmp_path: Path) -> None:
    clock = [100.0]
    rotation = Rotation(tmp_path, clock=lambda: clock[0])
    write_labels(tmp_path, "true")
    assert not rotation.out()
    rotation.tell(routed=False)  # the label moved; the kubelet has not rewritten the file yet
    assert rotation.out()
    clock[0] += 10 * READ_EVERY_S
    assert rotation.out(), "the stale file, unchanged, overrode a newer word"
    write_labels(tmp_path, "false")  # the kubelet catches up
    clock[0] += READ_EVERY_S
    assert rotation.out()
    rotation.tell(routed=True)  # routed again before the file shows it
    assert not rotation.out()
    clock[0] += READ_EVERY_S
    assert not rotation.out()
    write_labels(tmp_path, "true")
    clock[0] += READ_EVERY_S
    assert not rotation.out()
    rotation.tell(routed=False)  # a word lost (the runtime restarted): the file's change rules
    write_labels(tmp_path, "false")
    clock[0] += READ_EVERY_S
    assert rotation.out()
    write_labels(tmp_path, "true")
    clock[0] += READ_EVERY_S
    assert not rotation.out()


class NewerWordWins(RuleBasedStateMachine):
    """Any order of the operator's words, the kubelet's rewrites and the clock: once the file has
    been read again, the pod is out exactly when the newest word says so, a word being a tell or
    a change of the file's label (a rewrite with the same label says nothing new)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.clock = 100.0
        self.rotation = Rotation(self.dir, clock=lambda: self.clock)
        self.file: str | None = None  # the label in the file; None: no file
        self.seen: str | None = None  # the label when the runtime last read the file
        self.newest_out = False  # the newest word
        self.rotation.out()  # the first read (no file): routed
        self.read_at = self.clock

    def teardown(self) -> None:
        shutil.rmtree(self.dir)

    @rule(routed=st.booleans())
    def tell(self, routed: bool) -> None:
        self.rotation.tell(routed)
        self.seen, self.read_at = self.file, self.clock  # a tell reads the file first: older
        self.newest_out = not routed

    @rule(label=st.sampled_from(["true", "false", None]))
    def kubelet_writes(self, label: str | None) -> None:
        if label is None:
            (self.dir / LABELS_FILE).unlink(missing_ok=True)
        else:
            write_labels(self.dir, label)
        self.file = label

    @rule(seconds=st.sampled_from([0.2, READ_EVERY_S, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock += seconds

    @invariant()
    def out_follows_the_newest_word_once_read(self) -> None:
        out = self.rotation.out()
        if self.clock - self.read_at >= READ_EVERY_S:  # it read the file again
            if (self.file == "false") != (self.seen == "false"):  # the file changed its word
                self.newest_out = self.file == "false"
            self.seen, self.read_at = self.file, self.clock
        assert out == self.newest_out


TestNewerWordWins = NewerWordWins.TestCase
TestNewerWordWins.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_without_a_file_the_operator_s_word_is_all(tmp_path: Path) -> None:
    rotation = Rotation(tmp_path / "absent", clock=lambda: 100.0)
    assert not rotation.out()
    rotation.tell(routed=False)
    assert rotation.out()
    rotation.tell(routed=True)
    assert not rotation.out()


def test_told_out_of_the_rotation_responses_close_their_connections_at_once(
    engine_config: EngineConfig, tmp_path: Path
) -> None:
    write_labels(tmp_path, "true")  # and the file never changes: the kubelet is slow
    token = "s3cret-admin-token"
    auth = {"Authorization": f"Bearer {token}"}
    with (
        running_server(engine_config, pod_info_dir=str(tmp_path), admin_token=token) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        assert client.post("/admin/rotation", json={"routed": False}).status_code == 401
        wrong = client.post(
            "/admin/rotation", json={"routed": False}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 403
        bad = client.post("/admin/rotation", json={"routed": "maybe"}, headers=auth)
        assert bad.status_code == 400 and "routed" in bad.text, bad.text
        extra = client.post("/admin/rotation", json={"routed": False, "x": 1}, headers=auth)
        assert extra.status_code == 400, extra.text
        assert client.get("/health").headers.get("connection") != "close"  # nothing changed
        told = client.post("/admin/rotation", json={"routed": False}, headers=auth)
        assert told.status_code == 200 and told.json() == {"routed": False}
        assert told.headers.get("connection") == "close"  # from this very response on
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        served = client.post("/v1/completions", json=body)
        assert served.status_code == 200 and served.headers.get("connection") == "close"
        time.sleep(2 * READ_EVERY_S)  # the file, read again, has not changed: still out
        assert client.get("/health").headers.get("connection") == "close"
        back = client.post("/admin/rotation", json={"routed": True}, headers=auth)
        assert back.json() == {"routed": True} and back.headers.get("connection") != "close"


def test_out_of_the_rotation_every_response_closes_its_connection(
    engine_config: EngineConfig, tmp_path: Path
) -> None:
    write_labels(tmp_path, "true")
    with (
        running_server(engine_config, pod_info_dir=str(tmp_path)) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        first = client.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.headers.get("connection") != "close"
        write_labels(tmp_path, "false")
        answers = []
        deadline = time.monotonic() + 5 * READ_EVERY_S  # the label shows within a second
        while time.monotonic() < deadline:
            answers.append(client.post("/v1/completions", json=body))
            if answers[-1].headers.get("connection") == "close":
                break
        assert all(a.status_code == 200 for a in answers)  # served, then told to go
        assert answers[-1].headers.get("connection") == "close"
        assert client.get("/health").headers.get("connection") == "close"
        write_labels(tmp_path, "true")
        deadline = time.monotonic() + 5 * READ_EVERY_S
        while client.get("/health").headers.get("connection") == "close":
            assert time.monotonic() < deadline, "still closing connections once routed again"
            time.sleep(0.1)
