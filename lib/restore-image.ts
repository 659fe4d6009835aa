// The worker image on a restored Verda: nothing to do when the image ID the backup recorded is
// loaded; else the SFS cache copy when its sha256 is the recorded one, else Mello's copy streamed
// over the connection, else the cache bucket's object, which Verda downloads itself through a
// presigned URL for that one object (Verda never holds a key to that bucket: see below). A copy
// that arrives is written on SFS under a temporary name, checked against the recorded sha256,
// then renamed: it is the cache copy the next instance loads.
import path from 'node:path';
import { IMAGE_FILE } from './archive.ts';
import { humanSize, printable } from './cli.ts';
import { DEFAULT_LIMITS, type Limits } from './config.ts';
import { downloadTree, type DownloadTreeResult } from './download.ts';
import { openRegular } from './files.ts';
import { PresignedObject, R2Backend } from './r2.ts';
import { callVerda, type Report } from './remote.ts';
import type { Step, StepResult } from './step.ts';
import { IMAGE_KIND, shortId, type ImageRef, type RestoreSource } from './restore.ts';
import { requireSfs } from './sfs.ts';
import { program } from './sh.ts';
import { CommandFailed, said, type Host } from './ssh.ts';
import type { Backend, ObjectHead } from './storage.ts';

const sameId = (a: string, b: string) => a.replace(/^sha256:/, '') === b.replace(/^sha256:/, '');

export interface ImageRestoreOptions {
  host: Host;
  cli: string;
  image: string;
  source: RestoreSource;
  /** Where Verda keeps its copy of the image archive (SFS_BACKUP_DIR, under --root if given). */
  imageDir: string;
  /** The cache bucket, the last place the image is read from. */
  cacheBucket?: () => Backend;
  /** --root: the archive is left under the root, never loaded (the output says how). */
  load: boolean;
  /** SFS_MOUNT: the cache copy is written on SFS (lib/sfs.ts). */
  sfsMount?: string;
  /** The R2 timeouts and attempts Verda's download of the image uses. */
  limits?: Limits;
  skipReason?: string;
}

/**
 * How long the URL Verda downloads the image with holds: at least an hour, and the image's bytes
 * at a slow link's pace (256 KiB/s: 10 GB in 11 hours), at most S3's limit of 7 days. Past it every
 * range is refused and the step fails; the URL reads that one object only, which Verda then holds.
 */
export function imageUrlSeconds(bytes: number): number {
  return Math.min(7 * 86_400, Math.max(3600, Math.ceil(bytes / (256 * 1024))));
}

/**
 * The worker image back on Verda: the newest image a backup records whose bytes can still be had
 * whole (already loaded; the SFS cache copy; Mello's copy; the cache bucket's; each checked
 * against the recorded sha256), older recorded images only when the newer cannot be had. None:
 * the step fails naming the image, never a skipped row.
 */
export function imageRestoreStep(o: ImageRestoreOptions): Step {
  const sfsCopy = path.join(o.imageDir, IMAGE_FILE);
  return {
    name: 'Worker image',
    moves: `${o.host.label}: ${o.load ? `${o.cli} load ${o.image}, ` : ''}from ${sfsCopy}, else Mello's ${IMAGE_FILE}, else R2`,
    skipReason: o.skipReason,
    async run(ctx): Promise<StepResult> {
      if (!o.source.checked)
        return { status: 'skipped', summary: 'not restored: the backup did not check out (step 1)' };
      const wanted = o.source.images;
      if (!wanted.length)
        throw new Error(
          `no copy of the worker image ${o.image} (CONTAINER_IMAGE) to restore: ` +
            (o.source.absent.get(IMAGE_KIND) ?? 'no backup records one'),
        );
      const loaded = async () => {
        const r = await o.host.$({
          signal: ctx.signal,
          nothrow: true,
        })`sh -c ${program('image-id')} image-id ${o.cli} ${o.image}`;
        if (r.code === 127) throw new Error(`${o.cli} (CONTAINER_CLI) is not installed on ${o.host.label}`);
        return r.code === 0 ? r.stdout.trim() : undefined;
      };
      const before = o.load ? await loaded() : undefined;
      const sfs = await o.host.$({ signal: ctx.signal, nothrow: true })`sh -c ${program('sha256')} sha256 ${sfsCopy}`;
      const sfsSha = sfs.code === 0 ? sfs.stdout.split(' ')[0] : undefined;
      let r2Head: ObjectHead | undefined | null = null; // read once, when first needed
      const r2Holds = async (w: ImageRef) => {
        if (r2Head === null) r2Head = o.cacheBucket ? await o.cacheBucket().head(IMAGE_FILE, ctx.signal) : undefined;
        return r2Head?.metadata.sha256 === w.sha256 && r2Head.size === w.bytes;
      };
      // The newest image that can be had, and from where.
      const tried: string[] = [];
      let want: ImageRef | undefined;
      let from: 'loaded' | 'sfs' | 'mello' | 'r2' | undefined;
      for (const w of wanted) {
        if (before && sameId(before, w.imageId)) from = 'loaded';
        else if (sfsSha === w.sha256) from = 'sfs';
        else if (w.melloFile) from = 'mello';
        else if (await r2Holds(w)) from = 'r2';
        if (from) {
          want = w;
          break;
        }
        tried.push(`${shortId(w.imageId)} (${w.recordedIn})`);
      }
      if (!want || !from) {
        throw new Error(
          `the worker image cannot be had whole: ${tried.join(', ')} ` +
            `${tried.length === 1 ? 'is' : 'are'} not loaded on ${o.host.label} and no copy with its sha256 is on SFS, on Mello or in R2`,
        );
      }
      const short = shortId(want.imageId);
      const warnings =
        want === wanted[0]
          ? []
          : [`the newest recorded image cannot be had (${tried.join(', ')}): ${short} (${want.recordedIn}) instead`];
      if (from === 'loaded') return { summary: `image ${short} already loaded: nothing to do`, warnings };
      if (from !== 'sfs')
        await requireSfs(o.host, o.sfsMount, o.imageDir, 'keeping the image cache copy in', ctx.signal);
      const source =
        from === 'sfs'
          ? sfsCopy
          : from === 'mello'
            ? `Mello's ${want.melloFile}`
            : `${o.cacheBucket!().name}/${IMAGE_FILE}`;
      if (ctx.dryRun) {
        const then = o.load ? ` and load it with ${o.cli} load` : '';
        return { summary: `would bring image ${short} (${humanSize(want.bytes)}) from ${source}${then}`, warnings };
      }
      // Brought onto SFS (and checked there) unless the SFS copy is already the one.
      const bytes = from === 'sfs' ? 0 : want.bytes;
      if (from !== 'sfs') {
        if (sfsSha) warnings.push(`${sfsCopy} is not image ${short}: replaced`);
        const bucket = from === 'r2' ? o.cacheBucket!() : undefined;
        if (bucket instanceof R2Backend) {
          // Verda GETs the object itself, in ranges in flight at once, from a URL presigned for
          // that one key: the image crosses the link once, at the link's pace, instead of twice
          // through Mello's one SSH channel (its window over the round trip: 8 MB/s at 250 ms).
          await downloadOnVerda(o, ctx.signal, ctx.out, {
            url: bucket.presign(IMAGE_FILE, imageUrlSeconds(want.bytes)),
            source,
            dir: o.imageDir,
            name: IMAGE_FILE,
            bytes: want.bytes,
            sha256: want.sha256,
            limits: o.limits ?? DEFAULT_LIMITS,
          });
        } else {
          // Mello's copy, or a bucket that is not R2 (no URL to give): relayed over the connection.
          const stream =
            from === 'mello'
              ? (await openRegular(want.melloFile!)).handle.createReadStream({ highWaterMark: 1 << 20 })
              : await bucket!.get(IMAGE_FILE, ctx.signal);
          await o.host.$({
            stdin: stream,
            signal: ctx.signal,
          })`sh -c ${program('store')} store ${o.imageDir} ${IMAGE_FILE} ${want.sha256}`.catch((e) => {
            throw e instanceof CommandFailed
              ? new Error(`image ${short} from ${source} not kept on ${o.host.label}: ${said(e.result.stderr, 2)}`)
              : e;
          });
        }
      }
      if (!o.load) {
        return {
          summary: `image ${short} (${humanSize(want.bytes)}) left at ${sfsCopy}, not loaded (--root): load it with \`gzip -dc ${sfsCopy} | ${o.cli} load\``,
          bytes,
          warnings,
        };
      }
      await o.host.$({ signal: ctx.signal })`sh -c ${program('load')} ${`${o.cli} load`} ${sfsCopy} ${o.cli}`;
      const after = await loaded();
      if (!after || !sameId(after, want.imageId)) {
        throw new Error(
          `${o.cli} load gave ${o.image} the ID ${after ? shortId(after) : '(none)'}, ` +
            `not ${short} as ${want.recordedIn} records`,
        );
      }
      const kept = from === 'sfs' ? '' : `; kept as ${sfsCopy}`;
      return { summary: `image ${short} (${humanSize(want.bytes)}) loaded from ${source}${kept}`, bytes, warnings };
    },
  };
}

/**
 * The drill's (and --verify's) image check, from Mello alone: the newest recorded image whose
 * bytes Mello's copy or the cache bucket still holds (what is loaded on Verda or on SFS is not
 * seen from here). None: the step fails naming the image, as the restore's would.
 */
export function imageCopyStep(o: { source: RestoreSource; image: string; cacheBucket?: () => Backend }): Step {
  return {
    name: 'Worker image (a copy a restore could load)',
    moves: `Mello's ${IMAGE_FILE}, else the cache bucket's: the recorded sha256`,
    async run(ctx): Promise<StepResult> {
      if (!o.source.checked)
        return { status: 'skipped', summary: 'not checked: the backup did not check out (step 1)' };
      const wanted = o.source.images;
      if (!wanted.length)
        throw new Error(
          `no copy of the worker image ${o.image} (CONTAINER_IMAGE) to restore: ` +
            (o.source.absent.get(IMAGE_KIND) ?? 'no backup records one'),
        );
      const head = o.cacheBucket ? await o.cacheBucket().head(IMAGE_FILE, ctx.signal) : undefined;
      for (const w of wanted) {
        const where = [
          ...(w.melloFile ? [`Mello's ${IMAGE_FILE}`] : []),
          ...(head?.metadata.sha256 === w.sha256 && head.size === w.bytes
            ? [`${o.cacheBucket!().name}/${IMAGE_FILE}`]
            : []),
        ];
        if (!where.length) continue;
        const older =
          w === wanted[0] ? [] : [`the newest recorded image, ${shortId(wanted[0].imageId)}, has no copy here`];
        return {
          summary: `image ${shortId(w.imageId)} (${w.recordedIn}): ${where.join(' and ')} hold it whole`,
          warnings: older,
        };
      }
      throw new Error(
        `the worker image cannot be had from Mello or R2: ${wanted.map((w) => `${shortId(w.imageId)} (${w.recordedIn})`).join(', ')} ` +
          `${wanted.length === 1 ? 'has' : 'have'} no copy with its sha256 on Mello or in the cache bucket`,
      );
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The image from the cache bucket, downloaded by Verda itself
//
// Verda receives a URL that GETs worker-image.tar.gz of the cache bucket, and nothing else, for
// as long as imageUrlSeconds gives (r2.ts presignGet). It is no key pair: it cannot list, write,
// delete or read another object (the config bundle beside it), and it reads the bytes Verda is
// about to hold anyway. It goes on stdin like the models' key pair, is never printed, and is
// dropped when the call ends.

/** What Mello sends on stdin for `restore-image`: one JSON line. */
export interface ImageDownloadRequest {
  url: string;
  /** Where the object is, for messages (`r2://bucket/worker-image.tar.gz`): never the URL. */
  source: string;
  dir: string;
  name: string;
  bytes: number;
  sha256: string;
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

async function downloadOnVerda(
  o: ImageRestoreOptions,
  signal: AbortSignal,
  out: {
    transfer(what: string): { update(p: { bytes: number; total: number }): void; end(): void };
    detail(line: string): void;
  },
  request: ImageDownloadRequest,
) {
  const progress = out.transfer('image downloaded by Verda');
  const answer = await callVerda(o.host, 'restore-image', request, {
    signal,
    onProgress: (p) => progress.update(p),
    onLine: (line) => out.detail(`verda: ${line}`),
  }).finally(() => progress.end());
  // Verda's answer is data: an error or the failures named, bounded.
  const result = answer as unknown as Partial<DownloadTreeResult> & { error?: unknown };
  if (result.error !== undefined)
    throw new Error(
      `image from ${request.source} not kept on ${o.host.label}: ${printable(String(result.error).slice(0, 500))}`,
    );
  const failure = Array.isArray(result.failures) ? (result.failures[0] as { error?: unknown } | undefined) : undefined;
  if (failure || (result.downloaded !== 1 && result.inPlace !== 1))
    throw new Error(
      `image from ${request.source} not kept on ${o.host.label}: ${printable(String(failure?.error ?? 'no answer').slice(0, 500))}`,
    );
}

/**
 * Verda's side of `restore-image` (lib/verda.ts): the image into DIR/NAME with the download
 * engine (ranged GETs in flight at once, the sha256 taken as the bytes land, renamed only when it
 * is the recorded one), its progress reported as it goes.
 */
export async function restoreImageOnVerda(
  request: ImageDownloadRequest,
  signal: AbortSignal,
  report: Report,
): Promise<DownloadTreeResult> {
  const backend = new PresignedObject(request.url, request.source, { idleTimeoutMs: request.limits.r2IdleTimeoutMs });
  let done = 0;
  return downloadTree({
    root: request.dir,
    backend,
    items: (async function* () {
      yield {
        object: { key: request.name, size: request.bytes, etag: '' },
        rel: request.name,
        sha256: request.sha256,
      };
    })(),
    signal,
    attempts: request.limits.r2Attempts,
    backoffMs: request.limits.r2BackoffMs,
    idleTimeoutMs: request.limits.r2IdleTimeoutMs,
    onBytes: (n) => report({ bytes: (done += n), total: request.bytes }),
  });
}
