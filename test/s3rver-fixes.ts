// What s3rver 3.7.1 lacks and R2 (like S3) does, which the fault tests need in order to see
// what the scripts leave at the server. Importing this module teaches every s3rver of the process
// (its router and store are module singletons) to
//   - abort a multipart upload: DELETE /bucket/key?uploadId=X → 204, its parts removed; 404
//     NoSuchUpload when there is no such upload (s3rver answers 405 MethodNotAllowed);
//   - answer CompleteMultipartUpload for an unknown (completed or aborted) upload with 404
//     NoSuchUpload as R2 does (s3rver fails reading its files: 500);
//   - answer UploadPart for an unknown (or aborted) upload with 404 NoSuchUpload (s3rver creates
//     the upload's directory again), and drop a part whose request body was cut short (s3rver
//     waits for it forever);
//   - store a PutObject only once its whole body has arrived (s3rver writes it into the object as
//     it comes: a request cut short left a truncated object in place of the previous one);
//   - check Signature Version 4 (s3rver accepts any signature from a known key id, so a wrong
//     secret went unnoticed): a request signed with another secret gets 403 SignatureDoesNotMatch;
//   - read x-amz-copy-source URL-decoded as S3 does (s3rver's decodeURI leaves `%24` and the
//     other reserved characters encoded: a key with `$` or `&` was not found), and honour
//     x-amz-copy-source-if-match (412 PreconditionFailed when the source's ETag differs);
//   - keep a clock of its own (setServerClock, or S3RVER_CLOCK_OFFSET_MS): a request signed more
//     than 15 minutes from it gets 403 RequestTimeTooSkewed, and every answer carries the server's
//     Date, from which clients correct their own clock (s3rver uses this machine's clock).
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

const require = createRequire(import.meta.url);
const s3rverDir = path.dirname(require.resolve('s3rver/package.json'));
const router = require(path.join(s3rverDir, 'lib/routes.js'));
const FilesystemStore = require(path.join(s3rverDir, 'lib/stores/filesystem.js'));
const S3Error = require(path.join(s3rverDir, 'lib/models/error.js'));
const AWSAccount = require(path.join(s3rverDir, 'lib/models/account.js'));

interface Ctx {
  method: string;
  originalUrl: string;
  headers: Record<string, string | string[] | undefined>;
  params: { bucket: string; key: string };
  query: Record<string, string>;
  status: number;
  body: unknown;
  store: { getResourcePath(bucket: string, key: string | undefined, resource: string): string };
}

function uploadDir(ctx: Ctx, uploadId: string): string {
  return path.join(ctx.store.getResourcePath(ctx.params.bucket, undefined, 'uploads'), path.basename(uploadId));
}

function noSuchUpload(uploadId: string) {
  return new S3Error(
    'NoSuchUpload',
    'The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.',
    { UploadId: uploadId },
  );
}

async function abortMultipartUpload(ctx: Ctx) {
  const id = ctx.query.uploadId;
  const dir = uploadDir(ctx, id);
  const key = await fs.promises.readFile(path.join(dir, 'key'), 'utf8').catch(() => undefined);
  if (key !== ctx.params.key) throw noSuchUpload(id);
  await fs.promises.rm(dir, { recursive: true, force: true });
  ctx.status = 204;
  ctx.body = '';
}

{
  const layer = (router.stack as { path: string; methods: string[]; stack: Function[] }[]).find(
    (l) => l.path === '/:bucket/:key+' && l.methods.includes('DELETE'),
  );
  if (!layer) throw new Error('s3rver router: no DELETE /:bucket/:key+ route to extend');
  const original = layer.stack[layer.stack.length - 1];
  layer.stack[layer.stack.length - 1] = (ctx: Ctx, next: () => Promise<void>) =>
    'uploadId' in ctx.query ? abortMultipartUpload(ctx) : original(ctx, next);

  const putObjectMultipart = FilesystemStore.prototype.putObjectMultipart;
  FilesystemStore.prototype.putObjectMultipart = async function (
    this: { getResourcePath(bucket: string, key: string | undefined, resource: string): string },
    bucket: string,
    uploadId: string,
    parts: unknown,
  ) {
    const dir = path.join(this.getResourcePath(bucket, undefined, 'uploads'), path.basename(uploadId));
    if (!fs.existsSync(path.join(dir, 'key'))) throw noSuchUpload(uploadId);
    return putObjectMultipart.call(this, bucket, uploadId, parts);
  };

  type Store = {
    getResourcePath(b: string, k: string, r: string): string;
    putMetadata(...a: unknown[]): Promise<void>;
  };
  type Put = { bucket: string; key: string; content: Readable | Buffer; metadata: Record<string, string> };
  const putObject = FilesystemStore.prototype.putObject;
  FilesystemStore.prototype.putObject = async function (this: Store, object: Put) {
    // A completed multipart upload's parts arrive through s3rver's own stream of streams, which
    // ends early when read as below: that path is left as it was.
    if (Buffer.isBuffer(object.content) || !('complete' in object.content)) return putObject.call(this, object);
    // A request body (a single PUT) is held until whole, then written and on disk before the
    // answer (s3rver's own write of a buffer answers first: a HEAD right after saw a short object).
    const content = object.content;
    const chunks: Buffer[] = [];
    for await (const chunk of content) chunks.push(chunk as Buffer); // a cut request errors here
    if ((content as { complete?: boolean }).complete === false) throw new Error('request body cut short');
    const body = Buffer.concat(chunks);
    const file = this.getResourcePath(object.bucket, object.key, 'object');
    await fs.promises.mkdir(path.dirname(file), { recursive: true });
    await fs.promises.writeFile(file, body);
    const md5 = crypto.createHash('md5').update(body).digest('hex');
    await this.putMetadata(object.bucket, object.key, object.metadata, md5);
    return { size: body.length, md5 };
  };

  FilesystemStore.prototype.putPart = async function putPart(
    this: { getResourcePath(bucket: string, key: string | undefined, resource: string): string },
    bucket: string,
    uploadId: string,
    partNumber: string | number,
    content: Readable,
  ) {
    const dir = path.join(this.getResourcePath(bucket, undefined, 'uploads'), path.basename(uploadId));
    if (!fs.existsSync(path.join(dir, 'key'))) throw noSuchUpload(uploadId);
    const partPath = path.join(dir, String(partNumber));
    const md5 = crypto.createHash('md5');
    let size = 0;
    const tap = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        md5.update(chunk);
        size += chunk.length;
        cb(null, chunk);
      },
    });
    // A request cut mid-body ends as an error here (Node's IncomingMessage `aborted`), not as a
    // short part; a part written into an upload aborted meanwhile is removed again.
    const tmp = `${partPath}.${crypto.randomBytes(4).toString('hex')}.tmp`;
    try {
      await pipeline(content, tap, fs.createWriteStream(tmp));
      if ((content as { complete?: boolean }).complete === false) throw new Error('request body cut short');
      if (!fs.existsSync(path.join(dir, 'key'))) throw noSuchUpload(uploadId);
      fs.renameSync(tmp, partPath);
    } catch (e) {
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    const digest = md5.digest('hex');
    fs.writeFileSync(`${partPath}.md5`, digest);
    return { size, md5: digest };
  };
}

{
  const layer = (router.stack as { path: string; methods: string[]; stack: Function[] }[]).find(
    (l) => l.path === '/:bucket/:key+' && l.methods.includes('PUT'),
  );
  if (!layer) throw new Error('s3rver router: no PUT /:bucket/:key+ route to extend');
  const original = layer.stack[layer.stack.length - 1];
  type CopyCtx = Ctx & { store: { getMetadata(b: string, k: string): Promise<Record<string, string>> } };
  layer.stack[layer.stack.length - 1] = async (ctx: CopyCtx, next: () => Promise<void>) => {
    const source = ctx.headers['x-amz-copy-source'];
    if (typeof source === 'string') {
      // s3rver applies decodeURI, which leaves reserved characters alone: encodeURI undoes to the key.
      const decoded = decodeURIComponent(source);
      ctx.headers['x-amz-copy-source'] = encodeURI(decoded);
      const ifMatch = ctx.headers['x-amz-copy-source-if-match'];
      if (typeof ifMatch === 'string') {
        const [bucket, ...key] = decoded.replace(/^\//, '').split('/');
        const meta = await ctx.store.getMetadata(bucket, key.join('/')).catch(() => undefined);
        const bare = (etag: string) => etag.replace(/"/g, '');
        if (meta && bare(meta.etag ?? '') !== bare(ifMatch))
          throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', {
            Condition: 'x-amz-copy-source-If-Match',
          });
      }
    }
    return original(ctx, next);
  };
}

// The server's clock: this machine's plus an offset.
let clockOffsetMs = Number(process.env.S3RVER_CLOCK_OFFSET_MS ?? 0);
let announceClock = true;

/**
 * Puts the server's clock `offsetMs` from this machine's (0: the same). `announce: false` keeps
 * that clock to itself (no Date or ServerTime from it), so a client cannot correct its own.
 */
export function setServerClock(offsetMs: number, { announce = true } = {}) {
  clockOffsetMs = offsetMs;
  announceClock = announce;
}

const AMZ_DATE = /^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/;
const parseAmzDate = (v: string) => {
  const m = AMZ_DATE.exec(v);
  return m ? Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]) : NaN;
};
const formatAmzDate = (ms: number) => new Date(ms).toISOString().replace(/[-:]|\.\d+/g, '');

interface ClockCtx extends Ctx {
  res: { writeHead: (...args: unknown[]) => unknown; setHeader(name: string, value: string): void };
}

/** R2's check of the request time against the server's clock, and its Date on the answer. */
function checkClock(ctx: ClockCtx) {
  const offset = clockOffsetMs;
  if (announceClock) {
    // At writeHead: s3rver's error handler removes the headers set before it.
    const { res } = ctx;
    const writeHead = res.writeHead;
    res.writeHead = function (this: typeof res, ...args: unknown[]) {
      res.setHeader('Date', new Date(Date.now() + offset).toUTCString());
      return writeHead.apply(this, args);
    };
  }
  const sent = ctx.headers['x-amz-date'];
  if (typeof sent !== 'string') return;
  const requestTime = parseAmzDate(sent);
  const serverTime = Date.now() + offset;
  if (Math.abs(serverTime - requestTime) > 15 * 60_000) {
    const message = 'The difference between the request time and the current time is too large.';
    throw new S3Error('RequestTimeTooSkewed', message, {
      RequestTime: sent,
      ...(announceClock ? { ServerTime: new Date(serverTime).toISOString().replace(/\.\d+/, '') } : {}),
      MaxAllowedSkewMilliseconds: 900000,
    });
  }
}

/** s3rver's own check compares the request time with this machine's clock: it gets that time. */
function unskew(ctx: Ctx) {
  const sent = ctx.headers['x-amz-date'];
  if (typeof sent === 'string' && AMZ_DATE.test(sent)) {
    ctx.headers['x-amz-date'] = formatAmzDate(parseAmzDate(sent) - clockOffsetMs);
  }
}

// Signature Version 4, checked as R2 checks it: the canonical request rebuilt from what arrived.
const rfc3986 = (s: string) =>
  encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
const hmac = (key: string | Buffer, data: string) => crypto.createHmac('sha256', key).update(data).digest();

function checkSigV4(ctx: Ctx) {
  const auth = ctx.headers.authorization;
  if (typeof auth !== 'string' || !auth.startsWith('AWS4-HMAC-SHA256 ')) return;
  const fields = Object.fromEntries(
    auth
      .slice('AWS4-HMAC-SHA256 '.length)
      .split(',')
      .map((f) => f.trim().split('=') as [string, string]),
  );
  const [keyId, date, region, service, terminator] = (fields.Credential ?? '').split('/');
  const account = AWSAccount.registry.get(keyId);
  if (!account || terminator !== 'aws4_request') return; // s3rver's own check answers InvalidAccessKeyId
  const secret: string = account.accessKeys.get(keyId);
  const [rawPath, rawQuery = ''] = ctx.originalUrl.split(/\?(.*)/s);
  const query = rawQuery
    .split('&')
    .filter(Boolean)
    .map((p) => {
      const [k, v = ''] = p.split(/=(.*)/s);
      const dec = (x: string) => decodeURIComponent(x.replace(/\+/g, ' '));
      return `${rfc3986(dec(k))}=${rfc3986(dec(v))}`;
    })
    .sort()
    .join('&');
  const signed = (fields.SignedHeaders ?? '').split(';');
  const header = (name: string) => {
    const v = ctx.headers[name];
    return (Array.isArray(v) ? v.join(',') : (v ?? '')).trim().replace(/\s+/g, ' ');
  };
  const amzDate = header('x-amz-date');
  const canonical = [
    ctx.method,
    rawPath,
    query,
    signed.map((h) => `${h}:${header(h)}\n`).join(''),
    signed.join(';'),
    header('x-amz-content-sha256') || 'UNSIGNED-PAYLOAD',
  ].join('\n');
  const scope = `${date}/${region}/${service}/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, crypto.createHash('sha256').update(canonical).digest('hex')].join(
    '\n',
  );
  const key = hmac(hmac(hmac(hmac(`AWS4${secret}`, date), region), service), 'aws4_request');
  const expected = hmac(key, toSign).toString('hex');
  if (expected !== fields.Signature) {
    throw new S3Error(
      'SignatureDoesNotMatch',
      'The request signature we calculated does not match the signature you provided. Check your key and signing method.',
      { AWSAccessKeyId: keyId },
    );
  }
}

{
  const layer = (router.stack as { stack: Function[] }[]).find((l) => l.stack.some((f) => f.name === 'authentication'));
  if (!layer) throw new Error('s3rver router: no authentication middleware to extend');
  const i = layer.stack.findIndex((f) => f.name === 'authentication');
  const original = layer.stack[i];
  layer.stack[i] = function authentication(ctx: ClockCtx, next: () => Promise<void>) {
    if (clockOffsetMs) checkClock(ctx);
    checkSigV4(ctx); // on the request as it arrived
    if (clockOffsetMs) unskew(ctx);
    return original(ctx, next);
  };
}
