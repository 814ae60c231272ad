"""progress=false: log lines in place of the bar (nas/engine/progress.py), issue 21 item 4."""
import os
import re
import subprocess
import sys

import pytest

from nas.engine.progress import LogProgress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(total, **kwargs):
    clock, lines = Clock(), []
    return LogProgress(total, "search", "tok", clock=clock, emit=lines.append, **kwargs), clock, lines


def test_a_line_at_each_tenth_when_tenths_come_before_the_interval():
    bar, clock, lines = make(1000)
    for _ in range(30):  # 10 tokens a second: a tenth (100 tokens) every 10 s, well inside 60 s
        clock.t += 1
        bar.update(10)
        bar.set_postfix(step=bar.n // 10, loss="5.000", refresh=False)
    assert len(lines) == 3
    # the line is written at update, before that step's postfix: the previous step's figures
    assert lines[0] == "search: 100/1,000 tok (10.0%), 10 tok/s, step 9, loss 5.000, ETA 1m30s"
    assert lines[2] == "search: 300/1,000 tok (30.0%), 10 tok/s, step 29, loss 5.000, ETA 1m10s"


def test_a_line_every_interval_on_a_long_run_with_the_interval_rate_and_eta():
    bar, clock, lines = make(1_000_000, every_seconds=60)
    for second in range(1, 181):  # 10 tok/s for 2 min, then 40 tok/s
        clock.t = second
        bar.update(10 if second <= 120 else 40)
    assert len(lines) == 3
    assert lines[1] == "search: 1,200/1,000,000 tok (0.1%), 10 tok/s, ETA 27h44m"  # 998,800 / 10 tok/s = 99,880 s
    # the rate is the last minute's; the ETA's is the mean since the first step ended: 3,590 tok in 179 s
    assert lines[2] == "search: 3,600/1,000,000 tok (0.4%), 40 tok/s, ETA 13h48m"  # 996,400 x 179 / 3,590 s


def test_a_resumed_run_counts_its_rate_from_where_it_resumed_and_reset_goes_back():
    bar, clock, lines = make(1000, initial=500)
    clock.t = 50
    bar.update(99)
    assert lines == []  # 599: the next tenth is 600
    bar.update(1)  # 100 tokens in 50 s; no ETA yet: the first step ended at this same moment
    assert lines == ["search: 600/1,000 tok (60.0%), 2 tok/s"]
    clock.t = 70
    bar.update(100)
    assert lines[-1] == "search: 700/1,000 tok (70.0%), 5 tok/s, ETA 59s"  # 300 left at 101 tok / 20 s: 59.4 s
    bar.reset(1000)  # back to 0 (a rollback): the ETA's clock starts again
    clock.t = 80
    bar.update(100)
    assert lines[-1] == "search: 100/1,000 tok (10.0%), 10 tok/s"
    clock.t = 90
    bar.update(100)
    assert lines[-1] == "search: 200/1,000 tok (20.0%), 10 tok/s, ETA 1m20s"
    with pytest.raises(ValueError, match="every_seconds"):
        LogProgress(10, "x", "tok", every_seconds=0)


def test_the_last_line_of_the_run_has_no_eta_and_later_figures_are_merged():
    bar, clock, lines = make(100)
    bar.set_postfix({"valid_ppl": "300.00"})
    bar.set_postfix(loss="4.000")
    clock.t = 4
    bar.update(100)
    assert lines == ["search: 100/100 tok (100.0%), 25 tok/s, valid_ppl 300.00, loss 4.000"]
    bar, clock, lines = make(100)  # an estimated total overrun: 100%, never more
    clock.t = 4
    bar.update(120)
    assert lines == ["search: 120/120 tok (100.0%), 30 tok/s"]


LINE = re.compile(r"\[nas\.engine\.progress\]\[INFO\] - (search|train): ([\d,]+)/([\d,]+) tok \(([\d.]+)%\), "
                  r"[\d,]+ tok/s, step (\d+), loss [\d.]+(?:, valid_ppl [\d.]+)?(, ETA \w+)?$")


@pytest.mark.parametrize("script", ["search.py", "train.py"])
def test_search_and_train_with_progress_false_log_their_progress(tmp_path, corpus, script):
    common = ["experiment=smoke", "batch_size=4", "eval_batch_size=4", "bptt=8", "limit_train_batches=5",
              "limit_eval_batches=3", "progress=false", "num_threads=1", "epochs=2", f"dataset.root={corpus}",
              f"hydra.run.dir={tmp_path}/run"]
    extra = ["space.steps=3"] if script == "search.py" else ["arch=darts_v2", "space.emsize=16", "space.nhid=16"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, script)] + common + extra, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = [LINE.search(line) for line in r.stderr.splitlines() if "[nas.engine.progress]" in line]
    assert found and all(found), r.stderr[-3000:]
    steps, last = [int(m.group(5)) for m in found], found[-1]
    if script == "search.py":  # 2 epochs of 5 steps of 4 x 8 tokens: a line at each tenth, i.e. after every step
        assert steps == list(range(1, 11))
        assert last.group(2) == last.group(3) == "320"
    else:  # random step lengths (bptt 8 on average): a line at a step that passes a tenth, the last at 100%
        assert steps == sorted(set(steps)) and steps[-1] == 10 and len(steps) >= 5
        assert last.group(2) == last.group(3)
    assert last.group(4) == "100.0" and last.group(6) is None  # no ETA on the last line
    assert "\r" not in r.stderr  # no bar
