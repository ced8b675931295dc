"""The benchmark still runs end to end and prints its JSON contract (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.nbd import REPO

pytestmark = pytest.mark.e2e


def test_export_storm_prints_its_json_line_last() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.export_storm", "--backend", "nbd-server",
         "--vms", "2", "--disks", "2", "--workers", "2", "--min-reload-spacing", "2.0"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("backend", "exports", "listed", "reloads", "restarts", "crashes", "interrupted_transfers",
                "new_p50_ms", "new_p99_ms", "reuse_p50_ms", "reuse_p99_ms", "reuse_reloads"):  # fmt: skip
        assert key in result, key
    assert set(result["baseline"]) >= {"reloads", "crashes", "listed"}
    assert result["exports"] == 4 and result["listed"] == 4 and result["errors"] == []
    assert result["reuse_reloads"] == 0


def test_the_baseline_counts_no_reload_when_the_process_found_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The baseline reproduces nbd-server's reload bug, so what pgrep found can exit before its SIGHUP.
    from bench import export_storm

    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setattr(export_storm, "first_pgrep_pid", lambda marker: gone.pid)
    assert export_storm.sighup_first("any") is False

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(export_storm, "first_pgrep_pid", lambda marker: sleeper.pid)
        assert export_storm.sighup_first("any") is True
        assert sleeper.wait(timeout=10) == -signal.SIGHUP
    finally:
        sleeper.kill()
        sleeper.wait()


def test_migration_e2e_prints_its_json_line_last() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.migration_e2e", "--vms", "1", "--disks", "2", "--size-mib", "8", "--repeat", "2",
         "--tls"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("jobs", "completed", "sha256_mismatches", "reloads", "data_mb", "wall_s", "mb_s", "ratios",
                "bare_nbdcopy_mb_s", "ratio", "overhead_p95_ms"):  # fmt: skip
        assert key in result, key
    assert result["jobs"] == result["completed"] == 2 and result["sha256_mismatches"] == 0
    assert len(result["ratios"]) == 2 and result["ratio_spread"] >= 0
    assert result["tls"] is True and len(result["tls_vs_plain_all"]) == 2 and result["tls_vs_plain"] > 0


def run_bench(*args: str) -> dict[str, object]:
    """Run a benchmark in its own process group; on a timeout the whole group goes (its daphne too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{args[0]} ran past 300 s: {stderr[-2000:]}") from None
    assert proc.returncode == 0, stderr[-2000:]
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


def test_live_latency_prints_its_json_line_last() -> None:
    result = run_bench("bench.live_latency", "--clients", "3", "--events", "5")
    for key in ("clients", "events", "delivered", "p50_ms", "p95_ms", "max_ms", "database"):
        assert key in result, key
    assert result["clients"] == 3 and result["events"] == 5
    assert result["delivered"] == 15, "every event reaches every client at this gentle rate"


def test_page_scale_prints_its_json_line_last() -> None:
    result = run_bench("bench.page_scale", "--jobs", "40", "--mappings", "80", "--repeat", "2")
    pages = result["pages"]
    assert isinstance(pages, dict) and {"dashboard", "jobs", "mappings", "inventory", "nbd"} <= set(pages)
    for page in pages.values():
        assert {"p95_ms", "queries", "queries_at_10"} <= set(page)
    assert result["constant_queries"] is True
    tick = result["follower_tick"]
    assert isinstance(tick, dict) and tick["queries"] == tick["queries_at_10"] > 5, tick
    assert "tick_ratio" in result


def test_fleet_prints_its_json_line_last(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    result = run_bench(
        "bench.fleet", "--vms", "3", "--disks", "2", "--size-mib", "8", "--slots", "4", "--rounds", "2",
        "--rate-mbit", "400", "--events", str(events),
    )  # fmt: skip
    for key in ("vms", "rounds", "completed", "sha256_mismatches", "slots", "max_attached", "max_concurrent_copies",
                "detaches", "reattaches", "helper_writes_after_reattach", "reloads", "duplicate_tasks",
                "worker_processes", "peak_rss_mb", "slot_utilization", "overhead_p95_ms", "data_mb", "wall_s",
                "ideal_wall_s", "ratio"):  # fmt: skip
        assert key in result, key
    assert result["completed"] == 6 and result["sha256_mismatches"] == 0
    attached, detaches = int(str(result["max_attached"])), int(str(result["detaches"]))
    assert attached <= 4 and detaches > 0, "3 two-disk VMs through 4 slots must evict"
    assert result["helper_writes_after_reattach"] == 0 and result["reloads"] == 0
    # A slot counts as used while its copy runs at the VMA, not until the follower notices the copy ended.
    assert float(str(result["slot_utilization"])) <= float(str(result["slot_replicating_share"]))
    # Each job's timeline: placed, its copy started and ended at the VMA, then verified and completed.
    timelines = [json.loads(line) for line in events.read_text().splitlines()]
    assert sorted(t["round"] for t in timelines) == [1, 1, 1, 2, 2, 2]
    for timeline in timelines:
        kinds = [kind for _, kind, _ in timeline["events"]]
        order = ["job.started", "task.queued", "vma.started", "vma.finished", "sync.verified", "job.completed"]
        assert [kind for kind in kinds if kind in order] == order, kinds


@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="several nodes share a PostgreSQL database"
)
def test_fleet_on_two_nodes_survives_one_killed_mid_round() -> None:
    """Two nodes, the busier SIGKILLed once a sixth of the jobs finished: every job still completes on
    the other, with its bytes intact, and no volume was attached to both."""
    result = run_bench(
        "bench.fleet", "--vms", "6", "--disks", "2", "--size-mib", "16", "--slots", "4", "--rounds", "1",
        "--nodes", "2", "--kill-node-at", "15", "--stale-seconds", "4", "--postgres", os.environ["DATABASE_URL"],
    )  # fmt: skip
    for key in ("nodes", "per_node_max_attached", "replaced_after_node_loss", "cross_node_double_attach", "killed"):
        assert key in result, key
    assert result["nodes"] == 2 and result["completed"] == 6 and result["sha256_mismatches"] == 0
    assert int(str(result["per_node_max_attached"])) <= 4 and result["cross_node_double_attach"] == 0
    assert isinstance(result["killed"], dict) and result["killed"]["its_jobs"] > 0, result["killed"]
    assert int(str(result["replaced_after_node_loss"])) > 0, "the killed node had jobs under way: they moved"


def test_failover_prints_its_json_line_last() -> None:
    result = run_bench("bench.failover", "--vms", "2", "--disks", "2", "--size-mib", "8", "--changed-pct", "5")
    for key in ("vms", "running", "sha256_mismatches", "rollbacks_ok", "final_sync_ms_p50", "downtime_ms_p50",
                "downtime_ms_p95", "control_overhead_ms_p95"):  # fmt: skip
        assert key in result, key
    assert result["vms"] == result["running"] == result["rollbacks_ok"] == 2
    assert result["sha256_mismatches"] == 0
