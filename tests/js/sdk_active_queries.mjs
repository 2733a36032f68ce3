#!/usr/bin/env node
// The official Spice.ai JavaScript SDK's listActiveQueries() and cancelActiveQuery() over HTTP
// (tests/test_active_queries.py), against a query another client keeps running.
//
//   echo '{"httpUrl": "http://127.0.0.1:PORT", "sqlPreview": "SELECT ...", "unknownId": "<uuid>", "apiKey": "..."}' \
//     | node tests/js/sdk_active_queries.mjs
//
// Polls listActiveQueries() (up to 20 s) for the query whose sql_preview is `sqlPreview`, cancels it
// with cancelActiveQuery(), then asks to cancel "not-a-uuid" and `unknownId` to capture the SDK's
// errors. Prints one JSON line: {"listed": {...}, "cancelled": {...}, "invalid": "<error>", "unknown": "<error>"}.

import { readFileSync } from 'node:fs';

for (const name of ['log', 'info', 'debug', 'warn']) {  // stdout carries only the result line
  console[name] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

const job = JSON.parse(process.argv[2] ?? readFileSync(0, 'utf8'));
const { SpiceClient } = await import('@spiceai/spice');
const client = new SpiceClient({ httpUrl: job.httpUrl, apiKey: job.apiKey, httpOnly: true, logging: false });
client.setMaxRetries(0);

let listed;
for (const deadline = Date.now() + 20_000; !listed && Date.now() < deadline;) {
  listed = (await client.listActiveQueries()).find((q) => q.sql_preview === job.sqlPreview);
  if (!listed) await new Promise((resolve) => setTimeout(resolve, 100));
}
if (!listed) {
  process.stderr.write(`no active query with sql_preview ${JSON.stringify(job.sqlPreview)}\n`);
  process.exit(1);
}
const cancelled = await client.cancelActiveQuery(listed.query_id);
const invalid = await errorOf(client.cancelActiveQuery('not-a-uuid'));
const unknown = await errorOf(client.cancelActiveQuery(job.unknownId));
process.stdout.write(JSON.stringify({ listed, cancelled, invalid, unknown }) + '\n');
