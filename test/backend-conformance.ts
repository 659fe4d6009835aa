// What every Backend must do, as one suite: run on the in-memory backend and on R2Backend over a
// real S3 server (test/backend.test.ts). Sync, rotation and verify are written against this
// contract, so a backend that passes it can carry them.
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import { Readable } from 'node:stream';
import type { Test } from 'uvu';
import { readBackSha256, SourceChanged, StorageError, type Backend, type Source } from '../lib/storage.ts';

export function bufferSource(data: Buffer): Source {
  return { size: data.length, describe: 'buffer', open: (start, end) => Readable.from([data.subarray(start, end)]) };
}

/** A source whose stream gives `goodBytes` bytes, then fails as a file that changed under it. */
function changingSource(size: number, goodBytes: number): Source {
  const data = crypto.randomBytes(size);
  return {
    size,
    describe: 'changing',
    open: (start, end) =>
      Readable.from(
        (async function* () {
          const stop = Math.min(end, Math.max(start, goodBytes));
          for (let at = start; at < stop; at += 64 * 1024) yield data.subarray(at, Math.min(stop, at + 64 * 1024));
          if (stop < end) throw new SourceChanged('changed while it was being sent');
        })(),
        { objectMode: false },
      ),
  };
}

/** A source that gives fewer bytes than it declares: a file that shrank. */
function shortSource(size: number, given: number): Source {
  const data = crypto.randomBytes(given);
  return { size, describe: 'short', open: (start, end) => Readable.from([data.subarray(start, Math.min(end, given))]) };
}

const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

export interface CopyConformance {
  /** A backend on another bucket of the same server: where copies go. */
  other: () => Backend;
  /** The server copies an object of `big` bytes in parts (R2: UploadPartCopy, which s3rver lacks). */
  multipartCopy: boolean;
  /** The server refuses a copy whose x-amz-copy-source-if-match is not the source's ETag (Ceph 16's RGW ignores it). */
  ifMatch: boolean;
}

/**
 * Adds the conformance tests to `suite`. `backend()` gives a backend on an empty bucket;
 * `big` is a size that the backend sends in several parts (R2: multipart). `copies`: the copy
 * cases, between `backend()`'s bucket and another.
 */
export function backendConformance(suite: Test, backend: () => Backend, big: number, copies: CopyConformance) {
  suite('put, then head and get give the bytes, size and metadata back', async () => {
    const b = backend();
    const data = crypto.randomBytes(70_000);
    const put = await b.put('dir/a file ü.bin', bufferSource(data), {
      metadata: { sha256: sha(data), 'image-id': 'x' },
    });
    assert.is(put.size, data.length);
    assert.ok(put.etag, 'an ETag');
    const head = await b.head('dir/a file ü.bin');
    assert.is(head?.size, data.length);
    assert.is(head?.etag, put.etag);
    assert.is(head?.metadata.sha256, sha(data));
    assert.is(head?.metadata['image-id'], 'x');
    assert.is(await readBackSha256(b, 'dir/a file ü.bin'), sha(data));
  });

  suite('head of a missing key is undefined; delete removes, and deleting a missing key is fine', async () => {
    const b = backend();
    assert.is(await b.head('nothing/here'), undefined);
    await b.put('gone', bufferSource(Buffer.from('x')));
    await b.delete('gone');
    assert.is(await b.head('gone'), undefined);
    await b.delete('gone');
  });

  suite(
    'list gives every key under a prefix, in key order, with sizes, ETags and times, past a page of 1,000',
    async () => {
      const b = backend();
      // Stored times have a second's precision on some servers (and the clocks are one here).
      const before = Math.floor(Date.now() / 1000) * 1000 - 1000;
      const keys = Array.from({ length: 1010 }, (_, i) => `many/${String(i).padStart(4, '0')}`);
      for (let i = 0; i < keys.length; i += 50)
        await Promise.all(keys.slice(i, i + 50).map((k) => b.put(k, bufferSource(Buffer.from(k)))));
      await b.put('other/x', bufferSource(Buffer.from('x')));
      const listed = [];
      for await (const o of b.list('many/')) listed.push(o);
      assert.equal(
        listed.map((o) => o.key),
        keys,
      );
      assert.ok(listed.every((o) => o.size === 9 && o.etag));
      // restore-mello keeps a local file newer than its object: the listing says when each was stored.
      const after = Date.now() + 1000;
      assert.ok(
        listed.every((o) => o.modifiedMs !== undefined && o.modifiedMs >= before && o.modifiedMs <= after),
        `Last-Modified of each object: ${listed[0].modifiedMs} within ${before}..${after}`,
      );
    },
  );

  suite('a put replaces the object whole', async () => {
    const b = backend();
    await b.put('r', bufferSource(Buffer.from('first version')));
    const second = crypto.randomBytes(big);
    await b.put('r', bufferSource(second), { metadata: { sha256: sha(second) } });
    assert.is(await readBackSha256(b, 'r'), sha(second));
    assert.is((await b.head('r'))?.size, big);
  });

  suite(
    'a source that fails partway (a file changed): the put fails with that error, the old object stands',
    async () => {
      const b = backend();
      const old = Buffer.from('the good old bytes');
      await b.put('c', bufferSource(old), { metadata: { sha256: sha(old) } });
      for (const size of [200_000, big]) {
        const started = Date.now();
        const e = await b
          .put('c', changingSource(size, Math.floor(size / 2)), { metadata: { sha256: 'f'.repeat(64) } })
          .catch((x) => x);
        assert.instance(e, SourceChanged, `a ${size}-byte put rejects with the source's SourceChanged`);
        assert.ok(Date.now() - started < 10_000, 'at once, not after a timeout');
        assert.is(await readBackSha256(b, 'c'), sha(old), 'the old object is whole');
        assert.is((await b.head('c'))?.metadata.sha256, sha(old));
      }
    },
  );

  suite('a source shorter than it declares (a file that shrank) fails, and does not hang', async () => {
    const b = backend();
    const started = Date.now();
    const e = await b.put('s', shortSource(300_000, 100_000)).catch((x) => x);
    assert.instance(e, Error);
    assert.ok(Date.now() - started < 10_000, `failed in ${Date.now() - started} ms`);
    assert.is(await b.head('s'), undefined, 'nothing stored');
  });

  suite('a source whose check fails before commit: nothing stored', async () => {
    const b = backend();
    const data = crypto.randomBytes(big);
    const src: Source = {
      ...bufferSource(data),
      check: async () => {
        throw new SourceChanged('grew while it was being sent');
      },
    };
    const e = await b.put('k', src).catch((x) => x);
    assert.instance(e, SourceChanged);
    assert.is(await b.head('k'), undefined);
  });

  suite(
    'a ranged get gives exactly those bytes, at the start, in the middle and at the end; none past it',
    async () => {
      const b = backend();
      const data = crypto.randomBytes(big);
      await b.put('ranged', bufferSource(data));
      const read = async (start: number, end: number) => {
        const chunks: Buffer[] = [];
        for await (const c of (await b.get('ranged', undefined, { start, end })) as AsyncIterable<Buffer>)
          chunks.push(c);
        return Buffer.concat(chunks);
      };
      // Not `bytes=0-0`: s3rver 3.7.1 reads an end of 0 as "to the end" (R2 and S3 give one byte).
      for (const [start, end] of [
        [0, 2],
        [0, 4096],
        [1_000_003, 3_000_007],
        [big - 10, big],
        [big - 1, big],
      ]) {
        assert.ok((await read(start, end)).equals(data.subarray(start, end)), `bytes ${start}-${end}`);
      }
      assert.instance(await read(big - 10, big + 10).catch((e) => e), Error, 'a range beyond the object is refused');
      assert.instance(await read(big + 5, big + 10).catch((e) => e), Error, 'a range after the object is refused');
    },
  );

  suite("copy: the bytes into another bucket, with the metadata given in place of the source's", async () => {
    const b = backend();
    const into = copies.other();
    const data = crypto.randomBytes(70_000);
    const put = await b.put('src/a file ü $(x).json', bufferSource(data), {
      metadata: { sha256: sha(data), other: 'y' },
    });
    const copied = await into.copy(
      { backend: b, key: 'src/a file ü $(x).json', size: data.length, etag: put.etag },
      '20261201-120000/src/a file ü $(x).json',
      { metadata: { sha256: sha(data), sent: '2026-12-01T11:00:00.000Z' } },
    );
    assert.is(copied.size, data.length);
    const head = await into.head('20261201-120000/src/a file ü $(x).json');
    assert.is(head?.size, data.length);
    assert.is(head?.etag, copied.etag, 'the ETag the copy answered is the one a HEAD shows');
    assert.equal(head?.metadata, { sha256: sha(data), sent: '2026-12-01T11:00:00.000Z' });
    assert.is(await readBackSha256(into, '20261201-120000/src/a file ü $(x).json'), sha(data));
    assert.equal(
      (await b.head('src/a file ü $(x).json'))?.metadata,
      { sha256: sha(data), other: 'y' },
      'source untouched',
    );
  });

  if (copies.ifMatch)
    suite('copy: a source whose ETag is no longer the one given fails, and stores nothing', async () => {
      const b = backend();
      const into = copies.other();
      const first = await b.put('moving', bufferSource(Buffer.from('first')));
      await b.put('moving', bufferSource(Buffer.from('second, longer')));
      const stale = await into
        .copy({ backend: b, key: 'moving', size: 5, etag: first.etag }, 'kept/moving', { metadata: {} })
        .catch((e) => e);
      assert.instance(stale, StorageError);
      assert.is((stale as StorageError).status, 412);
      assert.not.ok((stale as StorageError).fatal, 'another copy may still succeed');
      assert.is(await into.head('kept/moving'), undefined, 'nothing stored for a stale ETag');
    });

  suite('copy: a source that is gone fails (404, not fatal), and stores nothing', async () => {
    const b = backend();
    const into = copies.other();
    const gone = await into
      .copy({ backend: b, key: 'never/there', size: 1 }, 'kept/never', { metadata: {} })
      .catch((e) => e);
    assert.instance(gone, StorageError);
    assert.is((gone as StorageError).status, 404);
    assert.not.ok((gone as StorageError).fatal, 'another copy may still succeed');
    assert.is(await into.head('kept/never'), undefined);
  });

  if (copies.multipartCopy)
    suite('copy: an object above the copy threshold is copied in parts, whole, with its metadata', async () => {
      const b = backend();
      const into = copies.other();
      const data = crypto.randomBytes(big);
      const put = await b.put('big/video.mp4', bufferSource(data), { metadata: { sha256: sha(data) } });
      const copied = await into.copy(
        { backend: b, key: 'big/video.mp4', size: big, etag: put.etag },
        'v/big/video.mp4',
        {
          metadata: { sha256: sha(data), mtime: '2026-12-01T10:00:00.000Z' },
        },
      );
      const head = await into.head('v/big/video.mp4');
      assert.is(head?.size, big);
      assert.is(head?.etag, copied.etag);
      assert.equal(head?.metadata, { sha256: sha(data), mtime: '2026-12-01T10:00:00.000Z' });
      assert.is(await readBackSha256(into, 'v/big/video.mp4'), sha(data));
    });
}
