// Versions of the users' files end to end, as the admin runs them: backup-mello.mts with
// R2_VERSIONS_BUCKET over three saves of a workflow, restore-mello.mts --as-of each of its four
// states, --list-versions, retention, a failing copy, and the user-files bucket compared with a
// run without versions. One scenario, run on s3rver (test/versions.test.ts) and on Ceph RGW
// (test/rgw.test.ts), both behind the fault proxy, which counts and breaks requests by bucket.
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { Test } from 'uvu';
import { timestamp } from '../lib/dated.ts';
import { R2Backend } from '../lib/r2.ts';
import { readBackSha256, type ObjectInfo } from '../lib/storage.ts';
import { KEPT_FROM_KEY, readKeptFrom } from '../lib/versions.ts';
import type { FaultProxy } from './fault-proxy.ts';
import { out, runScript, sha256, tempDir, treeDigest, writeTree } from './helpers.ts';

export interface VersionsServer {
  /** The fault proxy in front of the server: what the scripts are given as R2_ENDPOINT. */
  proxy: FaultProxy;
  /** The server itself, for the test's own reads. */
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  createBucket(name: string): Promise<void>;
}

const FLOW = 'user_data/user007/workflows/flow.json';
const ODD = 'user_data/user007/workflows/$(touch PWNED) ü.json';
const NEW = 'user_data/user007/workflows/new.json';
const SETTINGS = 'user_data/user007/comfy.settings.json';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits past the next whole second and gives its stamp: a T after everything done so far. */
async function nextSecond(): Promise<string> {
  const now = Date.now();
  const boundary = Math.ceil((now + 1) / 1000) * 1000;
  await sleep(boundary - now + 50);
  return timestamp(new Date(boundary));
}

/** A stamp as an ISO local time, `2026-12-01T12:00:00` (or with a space). */
const isoOf = (stamp: string, sep = 'T') =>
  `${stamp.slice(0, 4)}-${stamp.slice(4, 6)}-${stamp.slice(6, 8)}${sep}${stamp.slice(9, 11)}:${stamp.slice(11, 13)}:${stamp.slice(13, 15)}`;

export function versionsScenario(test: Test, server: () => VersionsServer) {
  const USER_FILES = 'vers-user-files';
  const VERSIONS = 'vers-versions';
  const PLAIN = 'vers-user-files-plain';
  let work: string;
  let data: string;
  let env: Record<string, string>;
  let plainEnv: Record<string, string>;
  let s: VersionsServer;
  const bucket = (name: string) =>
    new R2Backend(
      { bucket: name, endpoint: s.endpoint, accessKeyId: s.accessKeyId, secretAccessKey: s.secretAccessKey },
      { backoffMs: 20 },
    );
  /** The four states of the workflows: stamp, digest of the whole data dir, flow.json's mtime. */
  const states: { t: string; digest: Record<string, string>; flowMtimeMs: number }[] = [];
  /** Run stamps of the runs that replaced flow.json. */
  const replacingRuns: string[] = [];

  const backup = (extra: Record<string, string> = {}) =>
    runScript('backup-mello.mts', ['--json'], { ...env, ...extra }, { limitMs: 60_000 });
  const restore = (args: string[]) => runScript('restore-mello.mts', args, env, { limitMs: 60_000 });
  /** The same inputs, with versions off, into a bucket of their own: what the bash original would hold. */
  const backupPlain = () => runScript('backup-mello.mts', [], plainEnv, { limitMs: 60_000 });

  /** Requests to a bucket since log entry `from`, by kind. */
  const requestsTo = (name: string, from: number) => {
    const byKind: Record<string, number> = {};
    for (const e of s.proxy.log.slice(from)) if (e.bucket === name) byKind[e.kind] = (byKind[e.kind] ?? 0) + 1;
    return byKind;
  };

  /** Saves the workflow as the ComfyUI front end does (a new content, its own mtime). */
  function save(content: string, mtimeMs: number, extra: Record<string, string> = {}) {
    writeTree(data, { [FLOW]: content, ...extra });
    fs.utimesSync(path.join(data, FLOW), mtimeMs / 1000, mtimeMs / 1000);
  }

  async function runBoth(expectCopies: number) {
    const from = s.proxy.log.length;
    const r = await backup();
    assert.is(r.code, 0, out(r));
    const plain = await backupPlain();
    assert.is(plain.code, 0, out(plain));
    const copies = s.proxy.log.slice(from).filter((e) => e.kind === 'copy');
    // A copy retried (a loaded machine's timeout) is one copy: counted by the key it writes.
    const copied = new Set(copies.map((e) => e.key));
    assert.is(copied.size, expectCopies, `${expectCopies} objects replaced: as many copies, no more`);
    assert.ok(
      copies.every((e) => e.bucket === VERSIONS),
      'copies go to the versions bucket only',
    );
    return JSON.parse(r.stdout) as { steps: { name: string; data?: Record<string, unknown> }[] };
  }

  async function recordState(flowMtimeMs: number) {
    const t = await nextSecond();
    states.push({ t, digest: treeDigest(data), flowMtimeMs });
  }

  test.before(async () => {
    s = server();
    for (const b of [USER_FILES, VERSIONS, PLAIN]) await s.createBucket(b);
    work = tempDir('versions');
    data = path.join(work, 'data');
    const base = {
      R2_ENDPOINT: s.proxy.endpoint,
      R2_ACCESS_KEY_ID: s.accessKeyId,
      R2_SECRET_ACCESS_KEY: s.secretAccessKey,
      MELLO_DATA_DIR: data,
      COMFYMULTI_R2_ATTEMPTS: '3',
      COMFYMULTI_R2_BACKOFF: '0.05',
      COMFYMULTI_R2_TIMEOUT: '10',
    };
    env = {
      ...base,
      R2_USER_FILES_BUCKET: USER_FILES,
      R2_VERSIONS_BUCKET: VERSIONS,
      COMFYMULTI_STATE_DIR: path.join(work, 'state'),
    };
    plainEnv = { ...base, R2_USER_FILES_BUCKET: PLAIN, COMFYMULTI_STATE_DIR: path.join(work, 'state-plain') };
  });

  test.after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  test('a workflow saved over three times across three runs: each replaced object kept by one copy', async () => {
    const hour = 3_600_000;
    const base = Date.parse('2026-11-30T08:00:00Z');
    writeTree(data, {
      [SETTINGS]: '{"theme":"dark"}',
      [ODD]: 'odd name, first',
      'outputs/user007/img_0001.png': 'png 1',
      'inputs/shared/ref.png': 'ref',
    });
    save('{"state":"A"}', base);
    await runBoth(0);
    await recordState(base);
    // B: the workflow and the settings saved over, a new workflow and a new output.
    save('{"state":"B, longer"}', base + hour, {
      [SETTINGS]: '{"theme":"light"}',
      [NEW]: '{"new":1}',
      'outputs/user007/img_0002.png': 'png 2',
    });
    let json = await runBoth(2);
    const kept = json.steps[0].data as { versionsKept: number };
    assert.is(kept.versionsKept, 2, 'the step says it kept two');
    await recordState(base + hour);
    save('{"state":"C, longer still"}', base + 2 * hour, { [ODD]: 'odd name, second' });
    json = await runBoth(2);
    await recordState(base + 2 * hour);
    save('{"state":"D"}', base + 3 * hour, { 'outputs/user007/img_0003.png': 'png 3' });
    json = await runBoth(1);
    await recordState(base + 3 * hour);
    // The versions bucket holds T/KEY for each replaced object, with its sha256, sent and mtime.
    const versions = bucket(VERSIONS);
    const listed: ObjectInfo[] = [];
    for await (const o of versions.list('')) listed.push(o);
    const flowVersions = listed.filter((o) => o.key.endsWith(`/${FLOW}`));
    assert.is(flowVersions.length, 3, listed.map((o) => o.key).join(', '));
    replacingRuns.push(...flowVersions.map((o) => o.key.slice(0, 15)));
    assert.ok(
      listed.some((o) => o.key.endsWith(`/${ODD}`)),
      'the odd name was kept too',
    );
    assert.ok(
      listed.some((o) => o.key === KEPT_FROM_KEY),
      'kept-from.json',
    );
    const first = await versions.head(flowVersions[0].key);
    assert.is(first?.metadata.sha256, sha256('{"state":"A"}'));
    assert.is(first?.metadata.mtime, new Date(base).toISOString(), "the file's mtime as it was sent");
    assert.ok(Date.parse(first!.metadata.sent) < flowVersions[0].modifiedMs!, 'sent before it was replaced');
    assert.is(await readBackSha256(versions, flowVersions[0].key), sha256('{"state":"A"}'));
  });

  test('an unchanged rerun makes no copy and sends no request at all to the versions bucket', async () => {
    const from = s.proxy.log.length;
    const r = await backup();
    assert.is(r.code, 0, out(r));
    assert.equal(requestsTo(VERSIONS, from), {}, 'no copy, no listing, no HEAD');
    assert.is(s.proxy.of('copy', from).length, 0);
  });

  test('the user-files bucket is byte for byte what a run without versions makes of the same inputs', async () => {
    const [withVersions, plain] = [bucket(USER_FILES), bucket(PLAIN)];
    const describe = async (b: R2Backend) => {
      const objects: Record<string, unknown> = {};
      for await (const o of b.list('')) {
        const head = await b.head(o.key);
        objects[o.key] = {
          size: o.size,
          etag: o.etag,
          metadata: head?.metadata,
          sha256: await readBackSha256(b, o.key),
        };
      }
      return objects;
    };
    const a = await describe(withVersions);
    assert.ok(Object.keys(a).length >= 8, Object.keys(a).join(', '));
    assert.equal(a, await describe(plain));
  });

  test('--as-of each of the four states (a stamp, ISO times, a bare date) restores exactly that state', async () => {
    const forms = [
      states[0].t,
      isoOf(states[1].t),
      isoOf(states[2].t, ' '),
      // A bare date is the end of that day: today's is now, the fourth state.
      `${states[3].t.slice(0, 4)}-${states[3].t.slice(4, 6)}-${states[3].t.slice(6, 8)}`,
    ];
    for (const [i, state] of states.entries()) {
      const to = path.join(work, `as-of-${i}`);
      const r = await restore(['--as-of', forms[i], '--to', to, '--json']);
      assert.is(r.code, 0, out(r));
      assert.equal(treeDigest(to), state.digest, `state ${'ABCD'[i]} as of ${forms[i]}`);
      // A version comes back with the mtime its file had; the current object with its own time.
      if (i < 3) assert.is(fs.statSync(path.join(to, FLOW)).mtimeMs, state.flowMtimeMs, `mtime of state ${'ABCD'[i]}`);
      const left = (JSON.parse(r.stdout).steps[0].data as { leftOut: number }).leftOut;
      assert.is(left, i === 0 ? 1 : 0, 'new.json, first sent after the first state, is left out of it');
    }
  });

  test('--as-of into MELLO_DATA_DIR: a differing file kept without --overwrite, replaced with it; nothing deleted', async () => {
    const args = ['--as-of', states[0].t, '--user', 'user007', '--only', 'user_data'];
    const dry = await restore([...args, '--dry-run', '--overwrite']);
    assert.is(dry.code, 0, out(dry));
    assert.is(fs.readFileSync(path.join(data, FLOW), 'utf8'), '{"state":"D"}', 'a dry run changes nothing');
    const kept = await restore(args);
    assert.is(kept.code, 0, out(kept));
    assert.is(fs.readFileSync(path.join(data, FLOW), 'utf8'), '{"state":"D"}');
    assert.match(kept.stdout, /kept: they differ here \(--overwrite replaces them\)/);
    assert.match(kept.stdout, /1 first sent after \d{8}-\d{6} left out \(1 of them here, left as they are\)/);
    assert.match(kept.stdout, /nothing here deleted: files made after then stay/);
    const over = await restore([...args, '--overwrite']);
    assert.is(over.code, 0, out(over));
    assert.is(fs.readFileSync(path.join(data, FLOW), 'utf8'), '{"state":"A"}');
    assert.is(fs.readFileSync(path.join(data, NEW), 'utf8'), '{"new":1}', 'a file made after T stays');
    assert.is(fs.readFileSync(path.join(data, SETTINGS), 'utf8'), '{"theme":"dark"}');
    // The next backup sends the restored workflow, keeping D as a version: nothing is lost.
    const from = s.proxy.log.length;
    const b = await backup();
    assert.is(b.code, 0, out(b));
    const copied = new Set(s.proxy.of('copy', from).map((e) => e.key));
    assert.is(copied.size, 3, 'flow, settings and the odd name replaced: three kept');
    const d = [];
    for await (const o of bucket(VERSIONS).list('')) if (o.key.endsWith(`/${FLOW}`)) d.push(o.key);
    assert.is(d.length, 4);
    assert.is(await readBackSha256(bucket(VERSIONS), d[3]), sha256('{"state":"D"}'));
  });

  test('--list-versions prints each version with its dates, size and the --as-of that restores it', async () => {
    const r = await restore(['--list-versions', FLOW]);
    assert.is(r.code, 0, out(r));
    assert.match(r.stdout, /current\s+13B\s+sent \d{4}-\d\d-\d\d \d\d:\d\d:\d\d/);
    for (const stamp of replacingRuns)
      assert.match(r.stdout, new RegExp(`${stamp}\\s+\\d+B\\s+sent .*\\(--as-of ${stamp}\\)`));
    assert.ok(r.stdout.indexOf(replacingRuns[2]) < r.stdout.indexOf(replacingRuns[0]), 'newest first');
    const none = await restore(['--list-versions', 'user_data/user007/never.json']);
    assert.is(none.code, 1, out(none));
    const bad = await restore(['--list-versions', '../etc/passwd']);
    assert.is(bad.code, 2, out(bad));
  });

  test('--as-of older than what is kept, or "yesterday 12:00" before versions began: exit 2 naming the oldest T', async () => {
    for (const t of ['yesterday 12:00', 'yesterday', '20200101-000000']) {
      const r = await restore(['--as-of', t, '--to', path.join(work, 'never')]);
      assert.is(r.code, 2, out(r));
      const m = /the oldest T that can be had is (\d{8}-\d{6})/.exec(r.stderr);
      assert.ok(m, r.stderr);
      assert.ok(m![1] <= states[0].t, `${m![1]}: versions were kept from the first run on`);
      assert.not.ok(fs.existsSync(path.join(work, 'never')), 'nothing was done');
      const ok = await restore(['--as-of', m![1], '--to', path.join(work, `oldest-${t.replace(/\W/g, '')}`)]);
      assert.is(ok.code, 0, `the oldest T named can be had: ${out(ok)}`);
    }
  });

  test('a copy that fails leaves the object unreplaced and the step failed; the next run keeps and replaces it', async () => {
    const before = await bucket(USER_FILES).head(FLOW);
    save('{"state":"E"}', Date.parse('2026-11-30T13:00:00Z'));
    s.proxy.fail(['copy'], 3); // every attempt (COMFYMULTI_R2_ATTEMPTS=3)
    const failed = await backup();
    s.proxy.clearFaults();
    assert.is(failed.code, 1, out(failed));
    assert.match(
      failed.stderr,
      /flow\.json: its earlier version could not be kept in r2:\/\/vers-versions .*: not replaced/,
    );
    assert.equal(await bucket(USER_FILES).head(FLOW), before, 'the object is as it was');
    const again = await backup();
    assert.is(again.code, 0, out(again));
    assert.is(await readBackSha256(bucket(USER_FILES), FLOW), sha256('{"state":"E"}'));
  });

  test('retention deletes only the versions of runs older than KEEP_VERSIONS_DAYS, raising kept-from first', async () => {
    const versions = bucket(VERSIONS);
    const day = 86_400_000;
    const old = timestamp(new Date(Date.now() - 31 * day));
    const young = timestamp(new Date(Date.now() - 29 * day));
    const put = (key: string) =>
      versions.put(key, { size: 3, describe: key, open: () => Readable.from([Buffer.from('old')]) });
    await put(`${old}/${FLOW}`);
    await put(`${old}/outputs/user007/gone.png`);
    await put(`${young}/${FLOW}`);
    const keysBefore: string[] = [];
    for await (const o of versions.list('')) keysBefore.push(o.key);
    // A kept-from.json that cannot be raised: nothing is deleted.
    const record = path.join(env.COMFYMULTI_STATE_DIR, 'versions.json');
    const dayOld = () => {
      const r = JSON.parse(fs.readFileSync(record, 'utf8'));
      fs.writeFileSync(
        record,
        JSON.stringify({ ...r, retentionAt: new Date(Date.now() - 25 * 3_600_000).toISOString() }),
      );
    };
    dayOld();
    s.proxy.fail(['put'], 3);
    const cut = await backup({ KEEP_VERSIONS_DAYS: '30' });
    s.proxy.clearFaults();
    assert.is(cut.code, 1, out(cut));
    const keysCut: string[] = [];
    for await (const o of versions.list('')) keysCut.push(o.key);
    assert.equal(keysCut, keysBefore, 'a retention that could not raise kept-from.json deleted nothing');
    // The daily pass of a run that kept nothing: one listing, the two old versions deleted.
    const from = s.proxy.log.length;
    const r = await backup({ KEEP_VERSIONS_DAYS: '30' });
    assert.is(r.code, 0, out(r));
    const deleted = s.proxy.log.slice(from).filter((e) => e.bucket === VERSIONS && e.kind === 'delete');
    assert.equal(
      [...new Set(deleted.map((e) => e.key))].sort(),
      [`${old}/${FLOW}`, `${old}/outputs/user007/gone.png`].sort(),
    );
    const keysAfter: string[] = [];
    for await (const o of versions.list('')) keysAfter.push(o.key);
    assert.equal(
      keysAfter,
      keysBefore.filter((k) => !k.startsWith(old)),
    );
    const kept = await readKeptFrom(versions);
    assert.ok(kept && Date.parse(kept.keptFrom) > Date.now() - 60_000, `kept-from raised: ${JSON.stringify(kept)}`);
    // So --as-of the first state is now older than what is kept.
    const refused = await restore(['--as-of', states[0].t, '--to', path.join(work, 'refused')]);
    assert.is(refused.code, 2, out(refused));
    assert.match(refused.stderr, /the oldest T that can be had is \d{8}-\d{6}.*retention/);
    // Not due again within the day.
    const from2 = s.proxy.log.length;
    const quiet = await backup({ KEEP_VERSIONS_DAYS: '30' });
    assert.is(quiet.code, 0, out(quiet));
    assert.equal(requestsTo(VERSIONS, from2), {});
  });
}
