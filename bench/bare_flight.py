"""The reference Flight servers: bare pyarrow with its native gRPC TLS, serving an in-memory table,
and the same with the table behind DataFusion (each ticket is run as SQL, as our runtime does).

    python -m bench.bare_flight PARQUET CERT KEY
        → prints "<tls port> <plaintext port> <datafusion tls port>", serves until stdin closes
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
from datafusion import SessionContext


class BareServer(flight.FlightServerBase):
    def __init__(self, location: str, table: pa.Table, **kwargs: object) -> None:
        super().__init__(location, **kwargs)
        self.table = table
        self.one = pa.table({"Int64(1)": pa.array([1], pa.int64())})

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        if ticket.ticket == b"SELECT 1":
            return flight.RecordBatchStream(self.one)
        return flight.RecordBatchStream(self.table)


class DataFusionServer(flight.FlightServerBase):
    def __init__(self, location: str, table: pa.Table, **kwargs: object) -> None:
        super().__init__(location, **kwargs)
        self.ctx = SessionContext()
        self.ctx.register_record_batches("big_mem", [table.to_batches()])

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        return flight.RecordBatchStream(pa.RecordBatchReader.from_stream(self.ctx.sql(ticket.ticket.decode())))


def main() -> None:
    parquet, cert, key = sys.argv[1:4]
    table = pq.read_table(parquet, columns=["id", "amount", "grp"])
    with open(cert, "rb") as c, open(key, "rb") as k:
        pair = flight.CertKeyPair(cert=c.read(), key=k.read())
    tls = BareServer("grpc+tls://127.0.0.1:0", table, tls_certificates=[pair])
    plain = BareServer("grpc://127.0.0.1:0", table)
    df_tls = DataFusionServer("grpc+tls://127.0.0.1:0", table, tls_certificates=[pair])
    print(tls.port, plain.port, df_tls.port, flush=True)
    sys.stdin.read()
    for server in (tls, plain, df_tls):
        server.shutdown()


if __name__ == "__main__":
    main()
