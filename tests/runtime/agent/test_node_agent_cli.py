"""``berth node-agent``'s flags: a bad value is a usage error naming the flag, before anything
binds or discovers."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from berth.cli import main


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--simulate-gpus", "bogus"], "--simulate-gpus 'bogus'"),
        (["--simulate-gpus", "1x1Gi", "--reserve", "lots"], "'--reserve'"),
        (["--simulate-gpus", "1x1Gi", "--lease", "5", "--grace", "1"], "--grace"),
        (["--simulate-gpus", "1x1Gi", "--heartbeat-interval", "5", "--lease", "2"],
         "--heartbeat-interval"),
        (["--simulate-gpus", "1x1Gi", "--cluster-dns", "10.96.0.10,kube-dns"], "'kube-dns'"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_refused_with_its_name(tmp_path: Path, flags: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["node-agent", "--socket", str(tmp_path / "a.sock"), *flags])
    assert result.exit_code != 0
    assert says in result.output
    assert not (tmp_path / "a.sock").exists()
