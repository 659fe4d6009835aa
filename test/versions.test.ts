// Versions of the users' files: --as-of's times, the sync keeping what it replaces (on the memory
// backend, by request counts), the choice of the version current at T, and the whole scenario
// (test/versions-scenario.ts) on s3rver behind the fault proxy.
import { suite } from 'uvu';
import { CreateBucketCommand } from '@aws-sdk/client-s3';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { asOfChoices, checkAsOf, parseAsOf, VersionIndex } from '../lib/as-of.ts';
import { UsageError } from '../lib/cli.ts';
import { timestamp } from '../lib/dated.ts';
import { CountingBackend, StorageError } from '../lib/storage.ts';
import { syncTree } from '../lib/sync.ts';
import { Versions, noteVersionsOff, parseVersionKey, readKeptFrom, versionKey } from '../lib/versions.ts';
import { FaultProxy } from './fault-proxy.ts';
import { SECRET, sha256, startS3, tempDir, writeTree, type S3Server } from './helpers.ts';
import { MemoryBackend } from './memory-backend.ts';
import { versionsScenario } from './versions-scenario.ts';

const times = suite('--as-of times');
// Tuesday 2026-12-01 15:30:00 local time.
const NOW = new Date(2026, 11, 1, 15, 30, 0).getTime();

times('a run stamp, ISO dates and times (local unless an offset is written)', () => {
  assert.is(parseAsOf('20261130-120000', NOW), new Date(2026, 10, 30, 12, 0, 0).getTime());
  assert.is(parseAsOf('2026-11-30T12:00', NOW), new Date(2026, 10, 30, 12, 0, 0).getTime());
  assert.is(parseAsOf('2026-11-30 12:00:30', NOW), new Date(2026, 10, 30, 12, 0, 30).getTime());
  assert.is(parseAsOf('2026-11-30T12:00:30.250', NOW), new Date(2026, 10, 30, 12, 0, 30, 250).getTime());
  assert.is(parseAsOf('2026-11-30T12:00:00Z', NOW), Date.UTC(2026, 10, 30, 12));
  assert.is(parseAsOf('2026-11-30T12:00:00+01:00', NOW), Date.UTC(2026, 10, 30, 11));
});

times('a bare date is the end of that day; yesterday and today, with or without a time', () => {
  assert.is(parseAsOf('2026-11-30', NOW), new Date(2026, 10, 30, 23, 59, 59, 999).getTime());
  assert.is(parseAsOf('20261130', NOW), new Date(2026, 10, 30, 23, 59, 59, 999).getTime());
  assert.is(parseAsOf('yesterday 12:00', NOW), new Date(2026, 10, 30, 12, 0).getTime());
  assert.is(parseAsOf('yesterday', NOW), new Date(2026, 10, 30, 23, 59, 59, 999).getTime());
  assert.is(parseAsOf('today 9:05', NOW), new Date(2026, 11, 1, 9, 5).getTime());
  assert.is(parseAsOf('Yesterday 12:00:30', NOW), new Date(2026, 10, 30, 12, 0, 30).getTime());
});

times('anything else is a usage error naming --as-of and the forms it takes', () => {
  for (const bad of [
    '',
    'noon',
    '2026-13-01',
    '2026-02-30',
    '20261130-250000',
    'yesterday 25:00',
    '1733050000',
    '2026-11-30T12',
  ]) {
    const e = (() => {
      try {
        parseAsOf(bad, NOW);
      } catch (x) {
        return x;
      }
    })();
    assert.instance(e, UsageError, bad);
    assert.match((e as Error).message, /^--as-of: .* is not a time: give a run's stamp/);
  }
});
times.run();

const keeping = suite('backup-mello keeping what it replaces (memory backend)');

async function setup() {
  const work = tempDir('versions-unit');
  const root = path.join(work, 'tree');
  const stateDir = path.join(work, 'state');
  fs.mkdirSync(stateDir);
  const users = new MemoryBackend('mem://user-files');
  const versions = new MemoryBackend('mem://versions');
  const sync = async (v?: Versions) => {
    const counted = new CountingBackend(users);
    const countedVersions = new CountingBackend(versions);
    const keeper = v ?? (await Versions.start({ backend: countedVersions, stateDir, keepDays: 30 }));
    const r = await syncTree({
      root,
      backend: counted,
      prefix: 'user_data/',
      cacheFile: path.join(stateDir, 'c.jsonl'),
      versions: keeper,
    });
    return { r, calls: counted.calls, versionCalls: countedVersions.calls, keeper };
  };
  return { work, root, stateDir, users, versions, sync };
}

keeping(
  'a changed file: its object copied to T/KEY (sha256, sent, mtime) before it is replaced; new and unchanged ones: no copy',
  async () => {
    const t = await setup();
    try {
      writeTree(t.root, { 'u1/flow.json': 'first', 'u1/other.json': 'other' });
      fs.utimesSync(path.join(t.root, 'u1/flow.json'), 1_700_000_000, 1_700_000_000);
      const first = await t.sync();
      assert.is(first.r.sent, 2);
      assert.is(first.versionCalls.copy ?? 0, 0, 'new files replace nothing');
      const sentAt = t.users.objects.get('user_data/u1/flow.json')!.modifiedMs;
      writeTree(t.root, { 'u1/flow.json': 'second, saved over' });
      await new Promise((r) => setTimeout(r, 1100)); // a run of its own second
      const second = await t.sync();
      assert.is(second.r.sent, 1);
      assert.is(second.r.versionsKept, 1);
      assert.equal(second.versionCalls, { copy: 1 }, 'one copy, nothing else asked of the versions bucket');
      assert.is(second.calls.head ?? 0, 0, "the old object's sha256 came from the hash cache: no HEAD");
      const key = versionKey(second.keeper.stamp, 'user_data/u1/flow.json');
      const kept = t.versions.objects.get(key)!;
      assert.is(kept.data.toString(), 'first');
      assert.equal(kept.metadata, {
        sha256: sha256('first'),
        sent: new Date(sentAt).toISOString(),
        mtime: new Date(1_700_000_000_000).toISOString(),
      });
      assert.is(t.users.objects.get('user_data/u1/flow.json')!.data.toString(), 'second, saved over');
      const again = await t.sync();
      assert.is(again.r.sent, 0);
      assert.equal(again.versionCalls, {}, 'an unchanged rerun: nothing');
    } finally {
      fs.rmSync(t.work, { recursive: true, force: true });
    }
  },
);

keeping(
  'a copy that fails: the object is not replaced, the file failed; the next run keeps it and replaces it',
  async () => {
    const t = await setup();
    try {
      writeTree(t.root, { 'u1/flow.json': 'first' });
      await t.sync();
      writeTree(t.root, { 'u1/flow.json': 'second' });
      await new Promise((r) => setTimeout(r, 1100));
      const keeper = await Versions.start({ backend: t.versions, stateDir: t.stateDir, keepDays: 30 });
      t.versions.failNextCopy.set(
        versionKey(keeper.stamp, 'user_data/u1/flow.json'),
        new StorageError('copy refused', false, 500),
      );
      const failed = await t.sync(keeper);
      assert.is(failed.r.failureCount, 1);
      assert.match(
        failed.r.failures[0].error,
        /its earlier version could not be kept in mem:\/\/versions \(copy refused\): not replaced/,
      );
      assert.is(failed.calls.put ?? 0, 0, 'no put');
      assert.is(t.users.objects.get('user_data/u1/flow.json')!.data.toString(), 'first');
      const next = await t.sync();
      assert.is(next.r.sent, 1);
      assert.is(next.r.versionsKept, 1);
      assert.is(t.users.objects.get('user_data/u1/flow.json')!.data.toString(), 'second');
    } finally {
      fs.rmSync(t.work, { recursive: true, force: true });
    }
  },
);

keeping('a versions bucket that refuses the key stops the sync at once (fatal), naming it', async () => {
  const t = await setup();
  try {
    writeTree(t.root, Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`u1/${i}.json`, `v1 ${i}`])));
    await t.sync();
    writeTree(t.root, Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`u1/${i}.json`, `v2 ${i}`])));
    await new Promise((r) => setTimeout(r, 1100));
    const keeper = await Versions.start({ backend: t.versions, stateDir: t.stateDir, keepDays: 30 });
    const refused = new StorageError('R2 refused the credentials (403)', true, 403);
    t.versions.copy = async () => {
      throw refused;
    };
    const e = await t.sync(keeper).catch((x) => x);
    assert.instance(e, StorageError);
    assert.ok((e as StorageError).fatal);
    assert.match((e as Error).message, /could not be kept in mem:\/\/versions \(R2 refused the credentials \(403\)\)/);
    assert.ok(
      [...t.users.objects.values()].every((o) => o.data.toString().startsWith('v1')),
      'nothing replaced',
    );
  } finally {
    fs.rmSync(t.work, { recursive: true, force: true });
  }
});

keeping("two runs in one second: the second waits for the next, never writing over the first one's T/KEY", async () => {
  const t = await setup();
  try {
    writeTree(t.root, { 'u1/flow.json': 'first' });
    await t.sync();
    writeTree(t.root, { 'u1/flow.json': 'second' });
    const a = await t.sync();
    writeTree(t.root, { 'u1/flow.json': 'third!' });
    const b = await t.sync();
    assert.ok(b.keeper.stamp > a.keeper.stamp, `${a.keeper.stamp} then ${b.keeper.stamp}`);
    const kept = [...t.versions.objects.keys()].filter((k) => parseVersionKey(k)).sort();
    assert.is(kept.length, 2);
    assert.equal(
      kept.map((k) => t.versions.objects.get(k)!.data.toString()),
      ['first', 'second'],
    );
  } finally {
    fs.rmSync(t.work, { recursive: true, force: true });
  }
});
keeping(
  'kept-from.json: written when versions are turned on, raised after a run without them, trusted by a new Mello',
  async () => {
    const t = await setup();
    try {
      const start = async (now: Date) => {
        const v = await Versions.start({ backend: t.versions, stateDir: t.stateDir, keepDays: 30, now });
        assert.is(await v.begin(), undefined);
        return (await readKeptFrom(t.versions))!;
      };
      // Turned on at 9:00:00.911: kept from the run's stamp, 9:00:00, so that `--as-of` the stamp
      // the first run's versions carry (offered by --list-versions) can be had.
      const on = new Date(2026, 10, 1, 9, 0, 0, 911);
      const onSecond = new Date(2026, 10, 1, 9);
      assert.equal(await start(on), { keptFrom: onSecond.toISOString(), why: 'versions turned on' });
      await checkAsOf(onSecond.getTime(), t.versions);
      const counted = new CountingBackend(t.versions);
      const again = await Versions.start({ backend: counted, stateDir: t.stateDir, keepDays: 30 });
      await again.begin();
      assert.equal(counted.calls, {}, 'checked once per Mello, then its record says so');
      // A run with versions off between: what it replaced was not kept.
      noteVersionsOff(t.stateDir, new Date(2026, 10, 2, 9));
      const back = new Date(2026, 10, 3, 9);
      const raised = await start(back);
      assert.is(raised.keptFrom, back.toISOString());
      assert.match(raised.why, /versions were off on this Mello from 2026-11-02/);
      // A new disk (no record): what is stored is trusted, not moved.
      fs.rmSync(path.join(t.stateDir, 'versions.json'));
      assert.is((await start(new Date(2026, 10, 4, 9))).keptFrom, back.toISOString());
    } finally {
      fs.rmSync(t.work, { recursive: true, force: true });
    }
  },
);

keeping(
  "kept-from.json in the hour repeated when clocks go back: the run's own second, not an hour early",
  async () => {
    const t = await setup();
    const tz = process.env.TZ;
    process.env.TZ = 'Europe/Berlin';
    try {
      // 01:20:00.005Z is the second 02:20 local on 2025-10-26: its stamp reads as the first one.
      const started = new Date('2025-10-26T01:20:00.005Z');
      const v = await Versions.start({ backend: t.versions, stateDir: t.stateDir, keepDays: 30, now: started });
      assert.is(await v.begin(), undefined);
      assert.is((await readKeptFrom(t.versions))!.keptFrom, '2025-10-26T01:20:00.000Z');
    } finally {
      if (tz === undefined) delete process.env.TZ;
      else process.env.TZ = tz;
      fs.rmSync(t.work, { recursive: true, force: true });
    }
  },
);
keeping(
  'retention: versions of runs older than the limit deleted page by page, kept-from.json raised before each page',
  async () => {
    const t = await setup();
    try {
      const now = Date.now();
      const day = 86_400_000;
      const store = (stamp: string, key: string, modifiedMs: number) =>
        t.versions.objects.set(versionKey(stamp, key), { data: Buffer.from('v'), etag: 'e', metadata: {}, modifiedMs });
      // 1,203 old versions (two pages of deletes), one a day younger than the limit.
      for (let i = 0; i < 1203; i++)
        store(timestamp(new Date(now - 40 * day + i * 1000)), `outputs/u/${i}.png`, now - 40 * day + i * 1000 + 500);
      store(timestamp(new Date(now - 29 * day)), 'user_data/u/flow.json', now - 29 * day);
      const raises: string[] = [];
      const counted = new CountingBackend(t.versions);
      const put = counted.put.bind(counted);
      counted.put = async (key, source, opts) => {
        raises.push(`${key} after ${counted.calls.delete ?? 0} deletes`);
        return put(key, source, opts);
      };
      const v = await Versions.start({ backend: counted, stateDir: t.stateDir, keepDays: 30 });
      assert.ok(v.retentionDue(), 'never ran: due');
      const r = await v.retention(undefined, now);
      assert.is(r.deleted, 1203);
      assert.equal(raises, ['kept-from.json after 0 deletes', 'kept-from.json after 1000 deletes']);
      assert.equal(
        [...t.versions.objects.keys()].filter((k) => parseVersionKey(k)),
        [versionKey(timestamp(new Date(now - 29 * day)), 'user_data/u/flow.json')],
      );
      assert.is(
        (await readKeptFrom(t.versions))!.keptFrom,
        new Date(Math.floor((now - 40 * day + 1202 * 1000 + 500) / 1000) * 1000 + 1000).toISOString(),
        'the second after the last deleted was replaced',
      );
      assert.not.ok(v.retentionDue(now + 3_600_000), 'not again within the day');
      assert.ok(v.retentionDue(now + day + 1), 'once a day');
    } finally {
      fs.rmSync(t.work, { recursive: true, force: true });
    }
  },
);
keeping.run();

const choosing = suite('the version current at T');

choosing(
  'each interval gives its state; a key first sent after T is left out; one replaced before T is not',
  async () => {
    const users = new MemoryBackend('mem://user-files');
    const versions = new MemoryBackend('mem://versions');
    const at = (h: number) => Date.UTC(2026, 11, 1, h);
    const store = (
      b: MemoryBackend,
      key: string,
      data: string,
      modifiedMs: number,
      metadata: Record<string, string> = {},
    ) =>
      b.objects.set(key, {
        data: Buffer.from(data),
        etag: crypto.createHash('md5').update(data).digest('hex'),
        metadata,
        modifiedMs,
      });
    // flow.json: A sent at 1h, replaced at 3h by B, replaced at 5h by C (current).
    store(users, 'user_data/u/flow.json', 'C', at(5));
    store(versions, `${timestamp(new Date(at(3)))}/user_data/u/flow.json`, 'A', at(3), {
      sha256: sha256('A'),
      sent: new Date(at(1)).toISOString(),
    });
    store(versions, `${timestamp(new Date(at(5)))}/user_data/u/flow.json`, 'B', at(5), {
      sha256: sha256('B'),
      sent: new Date(at(3)).toISOString(),
    });
    // late.json: first sent at 4h. gone.json: kept at 3h, its current object deleted by hand since.
    store(users, 'user_data/u/late.json', 'L', at(4));
    store(versions, `${timestamp(new Date(at(3)))}/user_data/u/gone.json`, 'G', at(3), {
      sha256: sha256('G'),
      sent: new Date(at(2)).toISOString(),
    });
    const choose = async (h: number) => {
      const index = new VersionIndex(versions, at(0) + h * 3_600_000, ['user_data/']);
      await index.load();
      const got: Record<string, string> = {};
      for await (const c of asOfChoices({ userFiles: users, index, prefix: 'user_data/', listing: 'user_data/' })) {
        if ('item' in c) {
          const from = (c.item.from ?? users) as MemoryBackend;
          got[c.item.rel] = from.objects.get(c.item.object.key)!.data.toString();
        } else got[c.leftOut.slice('user_data/'.length)] = 'left out';
      }
      return got;
    };
    const half = 0.5;
    assert.equal(await choose(0), { 'u/flow.json': 'left out', 'u/gone.json': 'left out', 'u/late.json': 'left out' });
    assert.equal(await choose(2 + half), { 'u/flow.json': 'A', 'u/gone.json': 'G', 'u/late.json': 'left out' });
    // Within T's second counts as after T: --as-of the stamp of the run that replaced A gives A.
    assert.equal(await choose(3), { 'u/flow.json': 'A', 'u/gone.json': 'G', 'u/late.json': 'left out' });
    assert.equal(await choose(4 + half), { 'u/flow.json': 'B', 'u/late.json': 'L' });
    assert.equal(await choose(6), { 'u/flow.json': 'C', 'u/late.json': 'L' });
  },
);
choosing.run();

const e2e = suite('versions end to end on s3rver');
let s3: S3Server;
let proxy: FaultProxy;
e2e.before(async () => {
  s3 = await startS3([]);
  proxy = await FaultProxy.start(s3.endpoint);
});
e2e.after(async () => {
  await proxy.close();
  await s3.stop();
});
versionsScenario(e2e, () => ({
  proxy,
  endpoint: s3.endpoint,
  accessKeyId: SECRET,
  secretAccessKey: SECRET,
  createBucket: async (name) => {
    await s3.client.send(new CreateBucketCommand({ Bucket: name }));
  },
}));
e2e.run();
