// `node --openssl-legacy-provider --import tsx bench/versions-cost.mts [--users N] [--hours N]`:
// what R2_VERSIONS_BUCKET costs for a workshop's usual churn, measured with backup-mello.mts
// itself against s3rver (loopback, through the fault proxy that counts requests by bucket).
//
// The day modelled (see README, "Earlier versions"): USERS users, each with 10 workflows (20 to
// 120 KiB of JSON) and a comfy.settings.json; every hour each user saves over 4 of their
// workflows and the settings, makes 12 outputs (1.2 MiB PNGs, new names: ComfyUI never writes
// over an output) and, every other hour, one input. One backup-mello run before the day and one
// an hour (HOURS of them), each with versions on, and the same day again with versions off (the
// user-files bucket the bash original would hold), so the two can be compared.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { R2Backend } from '../lib/r2.ts';
import { FaultProxy } from '../test/fault-proxy.ts';
import { SECRET, runScript, startS3, writeTree } from '../test/helpers.ts';

const { values } = parseArgs({
  options: { users: { type: 'string', default: '20' }, hours: { type: 'string', default: '8' } },
});
const USERS = Number(values.users);
const HOURS = Number(values.hours);
const KiB = 1024;
const MiB = 1024 * KiB;

// A seeded generator: the same day every time, so two runs of the bench compare.
let seed = 0x2357;
const random = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
const between = (lo: number, hi: number) => Math.floor(lo + random() * (hi - lo));

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'comfymulti-versions-cost-'));
const buckets = { on: 'cost-user-files', versions: 'cost-versions', off: 'cost-user-files-plain' };
const s3 = await startS3(Object.values(buckets));
const proxy = await FaultProxy.start(s3.endpoint);

const base = {
  R2_ENDPOINT: proxy.endpoint,
  R2_ACCESS_KEY_ID: SECRET,
  R2_SECRET_ACCESS_KEY: SECRET,
};
const runs = {
  on: { ...base, R2_USER_FILES_BUCKET: buckets.on, R2_VERSIONS_BUCKET: buckets.versions },
  off: { ...base, R2_USER_FILES_BUCKET: buckets.off },
};
const data = path.join(work, 'data');

/** The bytes and objects a bucket holds. */
async function holds(bucket: string) {
  const b = new R2Backend({ bucket, endpoint: s3.endpoint, accessKeyId: SECRET, secretAccessKey: SECRET });
  let bytes = 0;
  let objects = 0;
  for await (const o of b.list('')) {
    bytes += o.size;
    objects++;
  }
  return { bytes, objects };
}

const workflows = Array.from({ length: USERS }, () => Array.from({ length: 10 }, () => between(20 * KiB, 120 * KiB)));
let outputs = 0;
const json = (size: number) =>
  crypto
    .randomBytes(Math.ceil(size / 2))
    .toString('hex')
    .slice(0, size);

function hourOfWork(hour: number) {
  const files: Record<string, string | Buffer> = {};
  for (let u = 0; u < USERS; u++) {
    const user = `user${String(u + 1).padStart(3, '0')}`;
    const saved = hour === 0 ? workflows[u].map((_, i) => i) : [0, 1, 2, 3].map(() => between(0, 10));
    for (const i of new Set(saved)) files[`user_data/${user}/workflows/workflow-${i}.json`] = json(workflows[u][i]);
    files[`user_data/${user}/comfy.settings.json`] = json(between(2 * KiB, 4 * KiB));
    if (hour === 0) continue;
    for (let k = 0; k < 12; k++)
      files[`outputs/${user}/ComfyUI_${String(++outputs).padStart(5, '0')}_.png`] = crypto.randomBytes(1.2 * MiB);
    if (hour % 2 === 0) files[`inputs/${user}-ref-${hour}.png`] = crypto.randomBytes(between(200 * KiB, 2 * MiB));
  }
  writeTree(data, files);
}

const perRun: { hour: number; copies: number; seconds: { on: number; off: number } }[] = [];
let before = 0; // what the user-files bucket held after the first run: the day adds the rest
for (let hour = 0; hour <= HOURS; hour++) {
  hourOfWork(hour);
  const seconds = { on: 0, off: 0 };
  let copies = 0;
  for (const mode of ['on', 'off'] as const) {
    const from = proxy.log.length;
    const started = Date.now();
    const env = { ...runs[mode], MELLO_DATA_DIR: data, COMFYMULTI_STATE_DIR: path.join(work, `state-${mode}`) };
    const r = await runScript('backup-mello.mts', ['--json'], env, { limitMs: 600_000 });
    if (r.code !== 0) throw new Error(`backup-mello (versions ${mode}) exited ${r.code}:\n${r.stdout}\n${r.stderr}`);
    seconds[mode] = (Date.now() - started) / 1000;
    if (mode !== 'on') continue;
    copies = new Set(proxy.of('copy', from).map((e) => e.key)).size; // a retried copy is one
    // The objects this run replaced, as its summary lists them: each must have cost one copy.
    type Sent = { action: string; reason?: string };
    const steps = (JSON.parse(r.stdout) as { steps: { data?: { objects?: Sent[] } }[] }).steps;
    const replaced = steps.flatMap((st) => st.data?.objects ?? []).filter((a) => a.reason === 'changed').length;
    if (replaced !== copies) throw new Error(`hour ${hour}: ${replaced} objects replaced, ${copies} copies`);
  }
  perRun.push({ hour, copies, seconds });
  if (hour === 0) before = (await holds(buckets.on)).bytes;
}

const versions = await holds(buckets.versions);
const userFiles = await holds(buckets.on);
const plain = await holds(buckets.off);
const gb = (bytes: number) => bytes / 1e9;
const mb = (bytes: number) => (bytes / 1e6).toFixed(1);
const replacing = perRun.filter((r) => r.hour > 0);
const copies = replacing.reduce((n, r) => n + r.copies, 0);
const steady = versions.bytes * 30; // KEEP_VERSIONS_DAYS=30, a workshop day every day
const mean = (k: 'on' | 'off') => (replacing.reduce((n, r) => n + r.seconds[k], 0) / replacing.length).toFixed(2);

console.log(
  `Workshop day: ${USERS} users, ${HOURS} hourly runs after the first (${new Date().toISOString().slice(0, 10)}, ${os.cpus().length} cores, Node ${process.version})`,
);
console.log(
  `copies made: ${copies} in ${replacing.length} runs (${replacing.map((r) => r.copies).join(', ')}), each run's equal to the objects it replaced`,
);
console.log(
  `versions bucket after the day: ${versions.objects - 1} versions, ${mb(versions.bytes)} MB (and kept-from.json)`,
);
console.log(
  `user-files bucket after the day: ${userFiles.objects} objects, ${mb(userFiles.bytes)} MB (versions off: ${plain.objects} objects, ${mb(plain.bytes)} MB)`,
);
const added = userFiles.bytes - before;
console.log(
  `versions kept / bytes the day added to the user-files bucket: ${((versions.bytes / added) * 100).toFixed(1)} %`,
);
console.log(
  `at KEEP_VERSIONS_DAYS=30 with a workshop every day: ${gb(steady).toFixed(2)} GB kept, $${(gb(steady) * 0.015).toFixed(3)}/month at R2's $0.015/GB-month; ${copies * 30} CopyObject a month (class A, $4.50/million: $${((copies * 30 * 4.5) / 1e6).toFixed(4)})`,
);
console.log(`mean seconds per hourly run (loopback): versions on ${mean('on')}, off ${mean('off')}`);

await proxy.close();
await s3.stop();
fs.rmSync(work, { recursive: true, force: true });
