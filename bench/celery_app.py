"""The Celery anchor of the pipeline bench: one task that writes one row to
PostgreSQL, on the same RabbitMQ, with acks_late and prefetch multiplier 1."""
import os

import psycopg
from celery import Celery

app = Celery("recap_bench", broker=os.environ["BENCH_AMQP_URL"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    task_default_queue="celery_bench",
)

_conn = None


def _db():
    global _conn
    if _conn is None:
        _conn = psycopg.connect(os.environ["BENCH_DATABASE_URL"])
    return _conn


@app.task(name="bench.write_row")
def write_row(job_id, sent_at):
    conn = _db()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO celery_jobs (job_id, sent_at, done_at) "
            "VALUES (%s, to_timestamp(%s), clock_timestamp())",
            (job_id, sent_at),
        )
    conn.commit()
