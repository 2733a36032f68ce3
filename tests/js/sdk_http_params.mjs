#!/usr/bin/env node
// The official Spice.ai JavaScript SDK's parameterised `sql()` over HTTP only (tests/test_http_sql_formats.py).
//
//   echo '{"httpUrl": "http://127.0.0.1:PORT", "queries": [{"sql": "SELECT $1 AS a", "parameters": [1]}]}' \
//     | node tests/js/sdk_http_params.mjs
//
// Every query runs on a new SpiceClient({httpUrl, httpOnly: true}) with setMaxRetries(0) as
// `client.sql(sql, {parameters})`: the SDK POSTs {"sql", "parameters"} to /v1/sql with
// Content-Type: application/json and Accept: application/json, and rebuilds an Arrow table from the rows.
// Prints one JSON line: {"results": [{"rows": [...]} | {"error": "..."}, ...]} (one entry per query, in order).

import { readFileSync } from 'node:fs';

for (const name of ['log', 'info', 'debug', 'warn']) {  // stdout carries only the result line
  console[name] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}

function plain(value) {
  if (typeof value === 'bigint') return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === 'object') {
    if (typeof value.toJSON === 'function' && value.constructor !== Object) return plain(value.toJSON());
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

async function run(SpiceClient, httpUrl, { sql, parameters }) {
  const client = new SpiceClient({ httpUrl, httpOnly: true, logging: false });
  client.setMaxRetries(0);
  try {
    const table = await client.sql(sql, { parameters });
    return { rows: plain(table.toArray()) };
  } catch (err) {
    return { error: err instanceof Error ? err.message : String(err) };
  }
}

const job = JSON.parse(process.argv[2] ?? readFileSync(0, 'utf8'));
const { SpiceClient } = await import('@spiceai/spice');
const results = [];
for (const query of job.queries) results.push(await run(SpiceClient, job.httpUrl, query));
process.stdout.write(JSON.stringify({ results }) + '\n');
