// The Backend conformance suite on R2Backend over a real Ceph RGW (test/rgw.ts), and what RGW
// enforces as R2 does and s3rver does not: signatures, paging past 1,000 keys (server-side
// tokens, no legacy OpenSSL in Node), a 5 MiB floor on every part but the last, Content-MD5; the
// multipart copy of a version (UploadPartCopy, which s3rver lacks) and the versions scenario.
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  ListMultipartUploadsCommand,
  PutObjectCommand,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MiB } from '../lib/files.ts';
import { R2Backend } from '../lib/r2.ts';
import { asOfChoices, VersionIndex } from '../lib/as-of.ts';
import { downloadTree } from '../lib/download.ts';
import { readBackSha256, StorageError, type ObjectInfo } from '../lib/storage.ts';
import { syncTree } from '../lib/sync.ts';
import { parseVersionKey, Versions } from '../lib/versions.ts';
import { FaultProxy } from './fault-proxy.ts';
import { versionsScenario } from './versions-scenario.ts';
import { backendConformance, bufferSource } from './backend-conformance.ts';
import { startRgw, type Rgw } from './rgw.ts';

let rgw: Rgw;
let backend: R2Backend;
let versions: R2Backend;
const opts = { multipartThreshold: 5 * MiB, partSize: 5 * MiB, backoffMs: 20 };
const target = (bucket: string, secretAccessKey = rgw.secretAccessKey) => ({
  bucket,
  endpoint: rgw.endpoint,
  accessKeyId: rgw.accessKeyId,
  secretAccessKey,
});

async function openUploads(bucket: string): Promise<string[]> {
  const r = await rgw.client.send(new ListMultipartUploadsCommand({ Bucket: bucket }));
  return (r.Uploads ?? []).map((u) => `${u.Key} (${u.UploadId})`);
}

/** Runs `fn` on every item, `width` at a time. */
async function inFlight<T>(items: T[], width: number, fn: (item: T) => Promise<unknown>) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: width }, worker));
}

const conformance = suite('R2Backend over Ceph RGW');
conformance.before(async () => {
  rgw = await startRgw();
  await rgw.createBucket('conformance');
  await rgw.createBucket('rgw-checks');
  await rgw.createBucket('conformance-versions');
  // Parts of 5 MiB (R2's smallest, and RGW's) so that the big case is three parts.
  backend = new R2Backend(target('conformance'), opts);
  // Copies of 5 MiB and more in parts of 5 MiB: the big case is three UploadPartCopy.
  versions = new R2Backend(target('conformance-versions'), {
    ...opts,
    copyMultipartThreshold: 5 * MiB,
    copyPartSize: 5 * MiB,
  });
});
// Ceph 16's RGW copies whatever the source holds, ignoring x-amz-copy-source-if-match (R2 and S3
// honour it): that case is left out here, the others run.
backendConformance(conformance, () => backend, 11 * MiB, {
  other: () => versions,
  multipartCopy: true,
  ifMatch: false,
});
conformance.after.each(async () => {
  // No multipart upload may be left open by any case (R2 would bill its parts).
  const open = [...(await openUploads('conformance')), ...(await openUploads('conformance-versions'))];
  if (open.length) throw new Error(`multipart uploads left open: ${open.join(', ')}`);
});

conformance('RGW: a wrong secret is refused, and R2Backend says it is the credentials', async () => {
  const wrong = new R2Backend(target('rgw-checks', 'not-the-secret-of-this-user-at-all-00000'), opts);
  for (const attempt of [
    () => wrong.put('w', bufferSource(Buffer.from('x'))),
    () => wrong.head('w'),
    async () => {
      for await (const _ of wrong.list('')) break;
    },
  ]) {
    const e = await attempt().then(
      () => undefined,
      (x: unknown) => x,
    );
    assert.instance(e, StorageError);
    const err = e as StorageError;
    assert.is(err.status, 403, err.message);
    assert.ok(err.fatal, 'every other request would fail the same way');
    assert.match(err.message, /refused the credentials/);
  }
  assert.is(await backend.head('w'), undefined, 'nothing stored');
});

conformance('RGW: a listing of 2,500 keys pages right in a Node without the legacy OpenSSL provider', async () => {
  const keys = Array.from({ length: 2500 }, (_, i) => `page/${String(i).padStart(5, '0')}`);
  await inFlight(keys, 32, (Key) => rgw.client.send(new PutObjectCommand({ Bucket: 'rgw-checks', Key, Body: Key })));
  // This process may run with --openssl-legacy-provider (for s3rver): list from one that does not.
  const r2 = path.resolve(import.meta.dirname, '../lib/r2.ts');
  const code = `
    import { R2Backend } from ${JSON.stringify(r2)};
    const b = new R2Backend(JSON.parse(process.env.RGW_TARGET));
    const keys = [];
    for await (const o of b.list('page/')) keys.push(o.key);
    console.log(JSON.stringify({ keys, requests: b.pacer.attempts, execArgv: process.execArgv }));`;
  const env = { ...process.env, RGW_TARGET: JSON.stringify(target('rgw-checks')), NODE_OPTIONS: '' };
  const out = await new Promise<string>((resolve, reject) =>
    execFile(
      process.execPath,
      ['--import', 'tsx', '--input-type=module', '-e', code],
      { env, timeout: 60_000, maxBuffer: 16 * MiB },
      (e, stdout, stderr) => (e ? reject(new Error(`${e.message}\n${stderr}`)) : resolve(stdout)),
    ),
  );
  const got = JSON.parse(out.trim().split('\n').pop()!);
  assert.not.ok(
    got.execArgv.some((a: string) => a.includes('legacy')),
    'the lister has no legacy provider',
  );
  assert.equal(got.keys, keys);
  assert.is(got.requests.list, 3, 'three pages of at most 1,000');
});

conformance('RGW: a multipart upload with a 1 MiB part before the last is refused (EntityTooSmall)', async () => {
  const Bucket = 'rgw-checks';
  const Key = 'small-parts';
  const { UploadId } = await rgw.client.send(new CreateMultipartUploadCommand({ Bucket, Key }));
  try {
    const parts = [];
    for (const [n, size] of [
      [1, MiB],
      [2, 1024],
    ]) {
      const body = crypto.randomBytes(size);
      const p = await rgw.client.send(new UploadPartCommand({ Bucket, Key, UploadId, PartNumber: n, Body: body }));
      parts.push({ PartNumber: n, ETag: p.ETag });
    }
    const e = await rgw.client
      .send(new CompleteMultipartUploadCommand({ Bucket, Key, UploadId, MultipartUpload: { Parts: parts } }))
      .then(
        () => undefined,
        (x: { name?: string; $metadata?: { httpStatusCode?: number } }) => x,
      );
    assert.ok(e, 'the completion is refused');
    assert.is(e!.name, 'EntityTooSmall');
    assert.is(e!.$metadata?.httpStatusCode, 400);
  } finally {
    await rgw.client.send(new AbortMultipartUploadCommand({ Bucket, Key, UploadId }));
  }
  assert.equal(await openUploads(Bucket), []);
});

conformance('RGW: a body that does not match its Content-MD5 is refused (BadDigest), nothing stored', async () => {
  const wrongMd5 = crypto.createHash('md5').update('other bytes').digest('base64');
  const e = await rgw.client
    .send(new PutObjectCommand({ Bucket: 'rgw-checks', Key: 'md5', Body: 'the bytes', ContentMD5: wrongMd5 }))
    .then(
      () => undefined,
      (x: { name?: string; $metadata?: { httpStatusCode?: number } }) => x,
    );
  assert.is(e?.name, 'BadDigest');
  assert.is(e?.$metadata?.httpStatusCode, 400);
  assert.is(await new R2Backend(target('rgw-checks'), opts).head('md5'), undefined);
});

conformance(
  'RGW: an unchanged rerun of 2,501 files (one multipart) is 3 listing pages in parallel ranges, nothing else',
  async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-tree-'));
    const cacheFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-state-')), 'tree.jsonl');
    try {
      for (let u = 0; u < 25; u++) {
        const dir = path.join(root, `user ${u}`);
        fs.mkdirSync(dir);
        for (let i = 0; i < 100; i++) fs.writeFileSync(path.join(dir, `${i}.png`), `${u}/${i}`);
      }
      fs.writeFileSync(path.join(root, 'big.safetensors'), crypto.randomBytes(11 * MiB));
      const first = await syncTree({
        root,
        backend: new R2Backend(target('rgw-checks'), opts),
        prefix: 'tree/',
        cacheFile,
      });
      assert.is(first.sent, 2501);
      // A new backend: its request counts are the rerun's alone.
      const again = new R2Backend(target('rgw-checks'), opts);
      const r = await syncTree({ root, backend: again, prefix: 'tree/', cacheFile });
      assert.is(r.skipped, 2501);
      assert.is(r.hashed, 0);
      // The multipart object is known by the ETag its listing shows (RGW's completion answer
      // carries none the SDK reads): no HEAD. 2,501 keys are 3 pages, one range each.
      assert.equal(again.pacer.attempts, { list: 3 });
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
      fs.rmSync(path.dirname(cacheFile), { recursive: true, force: true });
    }
  },
);

conformance(
  'RGW: a changed big file is kept by a multipart copy (UploadPartCopy) before it is replaced, and comes back as of before',
  async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-versions-'));
    const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-vstate-'));
    const restored = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-asof-'));
    try {
      await rgw.createBucket('vsync-users');
      await rgw.createBucket('vsync-versions');
      const users = new R2Backend(target('vsync-users'), opts);
      // Copies of 5 MiB and more go in parts: the 11 MiB video is three UploadPartCopy.
      const versions = new R2Backend(target('vsync-versions'), {
        ...opts,
        copyMultipartThreshold: 5 * MiB,
        copyPartSize: 5 * MiB,
      });
      const video = path.join(root, 'u7/video.mp4');
      fs.mkdirSync(path.dirname(video));
      const first = crypto.randomBytes(11 * MiB);
      fs.writeFileSync(video, first);
      const cacheFile = path.join(stateDir, 'outputs.jsonl');
      const sync = async () =>
        syncTree({
          root,
          backend: users,
          prefix: 'outputs/',
          cacheFile,
          versions: await Versions.start({ backend: versions, stateDir, keepDays: 30 }),
        });
      assert.is((await sync()).sent, 1);
      // T: the next whole second, after the first send (times compare to the second).
      const t = Math.ceil((Date.now() + 1) / 1000) * 1000;
      await new Promise((r) => setTimeout(r, t - Date.now() + 50));
      fs.writeFileSync(video, crypto.randomBytes(11 * MiB));
      const second = await sync();
      assert.is(second.versionsKept, 1);
      const kept: ObjectInfo[] = [];
      for await (const o of versions.list('')) if (parseVersionKey(o.key)) kept.push(o);
      assert.is(kept.length, 1);
      assert.match(kept[0].etag, /-3$/, 'a multipart object of three parts');
      const sha = crypto.createHash('sha256').update(first).digest('hex');
      assert.is(await readBackSha256(versions, kept[0].key), sha);
      assert.is((await versions.head(kept[0].key))?.metadata.sha256, sha);
      assert.equal(await openUploads('vsync-versions'), []);
      // As of before the second run: the first bytes, through the one download engine.
      const index = new VersionIndex(versions, t, ['outputs/']);
      await index.load();
      async function* items() {
        for await (const c of asOfChoices({ userFiles: users, index, prefix: 'outputs/', listing: 'outputs/' }))
          if ('item' in c) yield c.item;
      }
      const r = await downloadTree({ root: restored, backend: users, items: items() });
      assert.is(r.downloaded, 1);
      assert.ok(fs.readFileSync(path.join(restored, 'u7/video.mp4')).equals(first));
    } finally {
      for (const d of [root, stateDir, restored]) fs.rmSync(d, { recursive: true, force: true });
    }
  },
);

// The versions scenario (test/versions-scenario.ts) with the scripts, through the fault proxy.
let proxy: FaultProxy;
conformance.before(async () => {
  proxy = await FaultProxy.start(rgw.endpoint);
});
versionsScenario(conformance, () => ({
  proxy,
  endpoint: rgw.endpoint,
  accessKeyId: rgw.accessKeyId,
  secretAccessKey: rgw.secretAccessKey,
  createBucket: (name) => rgw.createBucket(name),
}));

conformance.after(async () => {
  await proxy?.close();
  await rgw?.stop();
});
conformance.run();
