-- Leadership among the workers on one database, as a lease row instead of a
-- session advisory lock (contract/src/leader.rs). An advisory lock lives in
-- the memory of one PostgreSQL server: after a failover to a standby it is
-- gone, and the worker that held it cannot tell. This row is replicated
-- like any other write (synchronously, with Patroni's synchronous_mode), so
-- the new primary knows who leads and since which epoch.
--
-- One row at most. The holder renews `expires_at` every second; another
-- worker takes the row only once it has expired or the holder's session
-- (`holder_pid`, its backend on this server) is gone, and taking it
-- increments `epoch`. A scheduled job checks, just before it writes, that it runs on a
-- primary (`NOT pg_is_in_recovery()`) and that the row still names its
-- holder and epoch, so a worker that lost the lease without noticing never
-- runs a job the new leader runs too.
CREATE TABLE omni_leader_lease (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder text NOT NULL,
    holder_pid integer NOT NULL,
    epoch bigint NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
