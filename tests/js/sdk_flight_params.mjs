#!/usr/bin/env node
// The official Spice.ai JavaScript SDK's parameterized `sql()` over Arrow Flight, as a test client.
//
//   node tests/js/sdk_flight_params.mjs '<job JSON>'      or      echo '<job JSON>' | node tests/js/sdk_flight_params.mjs
//
// The job:
//   flightUrl   "127.0.0.1:PORT" (host:port, plaintext)
//   apiKey      optional, sent as `authorization: Bearer <key>`
//   calls       [{"query": "SELECT * FROM t WHERE id = $1", "parameters": [2]},
//                {"query": "SELECT * FROM t WHERE id = $id", "parameters": {"id": 2}}, ...]
//               A parameter may be a plain JSON value (the SDK infers its Arrow type: integers are
//               Int64, other numbers Float64, strings Utf8) or the SDK's public Param shape
//               {"value": 2, "type": "Int32"}.
//
// The SDK (3.2.0, dist/node/grpc/client.node.js) runs such a call as a Flight SQL prepared statement:
// CreatePreparedStatement, DoPut of a one-row batch (columns `$1`, `$2`… for a list, the bare names
// for an object), GetFlightInfo and DoGet with the handle the DoPut returned, then ClosePreparedStatement.
//
// Prints exactly one JSON line on stdout and exits 0, or 1 when a call failed:
//   {"ok": true, "results": [{"query": "...", "rows": [{...}]}, ...]}
//   {"ok": false, "error": "...", "code": 3, "query": "...", "results": [...]}

import { readFileSync } from 'node:fs';

for (const name of ['log', 'info', 'debug', 'warn']) {
  console[name] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}

function jsonSafe(value) {
  if (typeof value === 'bigint') {
    return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  }
  if (Array.isArray(value)) return value.map(jsonSafe);
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, jsonSafe(v)]));
  }
  return value;
}

async function main() {
  const job = JSON.parse(process.argv[2] ?? readFileSync(0, 'utf8'));
  const { SpiceClient } = await import('@spiceai/spice');
  const results = [];
  for (const { query, parameters } of job.calls) {
    const config = { flightUrl: job.flightUrl, flightOnly: true, logging: false };
    if (job.apiKey) config.apiKey = job.apiKey;
    const client = new SpiceClient(config);
    client.setMaxRetries(0);
    try {
      const table = await client.sql(query, { parameters });
      results.push({ query, rows: jsonSafe(table.toArray().map((row) => row.toJSON())) });
    } catch (err) {
      process.stdout.write(JSON.stringify({ ok: false, error: err?.details ?? err?.message ?? String(err),
                                            code: err?.code ?? null, query, results }) + '\n');
      process.exit(1);
    }
  }
  process.stdout.write(JSON.stringify({ ok: true, results }) + '\n');
  process.exit(0);
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(err?.stack ?? err) }) + '\n');
  process.exit(1);
});
