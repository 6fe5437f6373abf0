"""Pipeline overhead: recap against Celery on the same RabbitMQ and
PostgreSQL, with the raw limits of both services measured in the same run.

Every scenario gets its own vhost and database. Throughput: N jobs are
queued first, then the consumers start; jobs/s = N / (last commit - first
commit). Latency: consumers running, jobs published at a steady rate below
capacity; added latency = commit time - publish time, p50 and p99.

recap runs its extractive engine, so that the model does not dominate:
- full path: recap.ingest -> router -> recap.compact -> worker -> commit -> ack
  (two broker hops, exactly-once effects);
- single hop: straight onto recap.compact -> worker -> commit -> ack.
Celery: acks_late, prefetch multiplier 1, a task that writes one row.
Concurrency: 2 worker processes on both sides (this machine has 2 cores).

Prints one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AMQP = "amqp://guest:guest@127.0.0.1:5672"
PG = "postgres://postgres@127.0.0.1:5432"


def sh(*args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        # Name the command and what it said: a bare exit status hides why.
        raise SystemExit(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r


class Scenario:
    """A private vhost and database, removed afterwards."""

    def __init__(self, tag):
        self.name = f"recap_bench_{tag}_{uuid.uuid4().hex[:8]}"
        sh("rabbitmqctl", "-q", "add_vhost", self.name)
        sh("rabbitmqctl", "-q", "set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {self.name}")
        self.amqp = f"{AMQP}/{self.name}"
        self.db = f"{PG}/{self.name}"
        self.procs = []

    def env(self, **extra):
        e = dict(os.environ)
        e.update(
            RECAP_AMQP_URL=self.amqp,
            RECAP_DATABASE_URL=self.db,
            RECAP_METRICS_LISTEN="",
            RECAP_LOG="warn",
            RECAP_ALLOW_DEV_CREDENTIALS="1",
            BENCH_AMQP_URL=self.amqp,
            BENCH_DATABASE_URL=self.db,
        )
        e.pop("RECAP_CONFIG", None)
        e.update(extra)
        return e

    def spawn(self, args, **extra):
        p = subprocess.Popen(args, env=self.env(**extra), cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def wait_count(db, sql, want, timeout=900):
    start = time.time()
    with psycopg.connect(db, autocommit=True) as c:
        while True:
            n = c.execute(sql).fetchone()[0]
            if n >= want:
                return n
            if time.time() - start > timeout:
                raise SystemExit(f"timed out at {n}/{want}: {sql}")
            time.sleep(0.2)


def stats(db, span_sql, lat_sql):
    with psycopg.connect(db, autocommit=True) as c:
        first, last, n = c.execute(span_sql).fetchone()
        out = {"jobs": n, "seconds": (last - first).total_seconds()}
        out["jobs_per_s"] = n / max(out["seconds"], 1e-9)
        if lat_sql:
            p50, p99 = c.execute(lat_sql).fetchone()
            out.update(p50_ms=p50, p99_ms=p99)
    return out


def pct_sql(expr, table_where):
    return (
        f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY {expr}), "
        f"percentile_cont(0.99) WITHIN GROUP (ORDER BY {expr}) FROM {table_where}"
    )


# --- recap --------------------------------------------------------------

RECAP_DONE = "SELECT count(*) FROM jobs WHERE status = 'succeeded'"
RECAP_SPAN = "SELECT min(finished_at), max(finished_at), count(*) FROM jobs WHERE status = 'succeeded'"
RECAP_LAT = pct_sql(
    "extract(epoch FROM finished_at) * 1000 - (metadata->>'sent_at')::float8 * 1000",
    "jobs WHERE status = 'succeeded'",
)


def recap_bench(recap):
    """The benchmarks' binary, built beside `recap` (`recap-bench`)."""
    return os.path.join(os.path.dirname(recap), "recap-bench")


def recap_fleet(sc, recap, hop, workers, prefetch, batch):
    # batch: deliveries already waiting that a process takes together (one
    # commit, one round of confirms); 1 = one job per transaction, with as
    # many jobs in flight as the prefetch allows (as before batching).
    common = dict(RECAP_AMQP_PREFETCH=str(prefetch))
    if batch == 1:
        common["RECAP_AMQP_BATCHES_IN_FLIGHT"] = str(prefetch)
    if hop == "ingest":
        sc.spawn([recap, "router"], RECAP_ROUTER_BATCH_SIZE=str(batch), **common)
    for _ in range(workers):
        sc.spawn([recap, "worker", "--tier", "compact"], RECAP_COMPACT_BATCH_SIZE=str(batch), **common)


def recap_publish(sc, recap, n, hop, rate=0.0):
    out = sh(recap_bench(recap), "publish", "--messages", str(n), "--routing-key", hop,
             "--rate", str(rate), env=sc.env())
    return json.loads(out.stdout)


def recap_run(recap, n, lat_n, rate, hop, workers, prefetch, batch):
    res = {}
    sc = Scenario(f"recap_{hop}_b{batch}")
    try:
        sh(recap, "migrate", env=sc.env())
        res["publish"] = recap_publish(sc, recap, n, hop)
        recap_fleet(sc, recap, hop, workers, prefetch, batch)
        wait_count(sc.db, RECAP_DONE, n)
        res["throughput"] = stats(sc.db, RECAP_SPAN, None)
    finally:
        sc.close()
    sc = Scenario(f"recap_{hop}_b{batch}_lat")
    try:
        sh(recap, "migrate", env=sc.env())
        recap_fleet(sc, recap, hop, workers, prefetch, batch)
        time.sleep(3)
        recap_publish(sc, recap, lat_n, hop, rate)
        wait_count(sc.db, RECAP_DONE, lat_n)
        res["latency"] = stats(sc.db, RECAP_SPAN, RECAP_LAT)
    finally:
        sc.close()
    return res


# --- Celery -------------------------------------------------------------

CELERY_DONE = "SELECT count(*) FROM celery_jobs"
CELERY_SPAN = "SELECT min(done_at), max(done_at), count(*) FROM celery_jobs"
CELERY_LAT = pct_sql(
    "extract(epoch FROM done_at - sent_at) * 1000", "celery_jobs"
)


def celery_publish(sc, n, rate=0.0):
    code = f"""
import time, uuid
from celery_app import write_row
n, rate = {n}, {rate}
start = time.time()
for i in range(n):
    if rate > 0:
        d = start + i / rate - time.time()
        if d > 0:
            time.sleep(d)
    write_row.apply_async((str(uuid.uuid4()), time.time()))
print(n / (time.time() - start))
"""
    out = sh(sys.executable, "-c", code, env=sc.env(), cwd=HERE)
    return float(out.stdout.strip().splitlines()[-1])


def celery_worker(sc, concurrency):
    sc.spawn([sys.executable, "-m", "celery", "-A", "celery_app", "worker",
              "-c", str(concurrency), "-P", "prefork", "-Q", "celery_bench",
              "--without-gossip", "--without-mingle", "--without-heartbeat",
              "-l", "WARNING"])


def celery_table(sc):
    with psycopg.connect(sc.db, autocommit=True) as c:
        c.execute("CREATE TABLE celery_jobs (job_id text PRIMARY KEY, "
                  "sent_at timestamptz NOT NULL, done_at timestamptz NOT NULL)")


def celery_run(n, lat_n, rate, concurrency):
    res = {}
    sc = Scenario("celery")
    try:
        celery_table(sc)
        res["publish_per_s"] = celery_publish(sc, n)
        celery_worker(sc, concurrency)
        wait_count(sc.db, CELERY_DONE, n)
        res["throughput"] = stats(sc.db, CELERY_SPAN, None)
    finally:
        sc.close()
    sc = Scenario("celery_lat")
    try:
        celery_table(sc)
        celery_worker(sc, concurrency)
        time.sleep(5)
        celery_publish(sc, lat_n, rate)
        wait_count(sc.db, CELERY_DONE, lat_n)
        res["latency"] = stats(sc.db, CELERY_SPAN, CELERY_LAT)
    finally:
        sc.close()
    return res


# --- raw limits ---------------------------------------------------------

def raw_run(recap, n):
    sc = Scenario("raw")
    try:
        broker = json.loads(sh(recap_bench(recap), "raw-broker", "--messages", str(n), env=sc.env()).stdout)
        pg = {
            str(c): json.loads(sh(recap_bench(recap), "raw-postgres", "--rows", str(n),
                                  "--connections", str(c), env=sc.env()).stdout)
            for c in (2, 8)
        }
    finally:
        sc.close()
    return {"broker": broker, "postgres": pg}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recap", default=os.path.join(ROOT, "target/release/recap"))
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--latency-jobs", type=int, default=1_000)
    ap.add_argument("--rate", type=float, default=100.0)
    # (batches in flight + 1) x batch: while two batches are handled, a
    # third waits whole in the prefetch window.
    ap.add_argument("--prefetch", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    a = ap.parse_args()
    scenarios = {
        "raw": lambda: raw_run(a.recap, a.jobs),
        "celery": lambda: celery_run(a.jobs, a.latency_jobs, a.rate, 2),
        "recap_full": lambda: recap_run(a.recap, a.jobs, a.latency_jobs, a.rate, "ingest", 2, a.prefetch, a.batch),
        "recap_single_hop": lambda: recap_run(a.recap, a.jobs, a.latency_jobs, a.rate, "compact", 2, a.prefetch, a.batch),
        # The same without batching: what group commit and pipelined confirms buy.
        "recap_full_unbatched": lambda: recap_run(a.recap, a.jobs, a.latency_jobs, a.rate, "ingest", 2, a.prefetch, 1),
    }
    only = [x for x in a.only.split(",") if x]
    out = {
        "jobs": a.jobs,
        "latency_jobs": a.latency_jobs,
        "latency_rate_per_s": a.rate,
        "prefetch": a.prefetch,
        "batch": a.batch,
    }
    for name, run in scenarios.items():
        if not only or name in only:
            out[name] = run()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
