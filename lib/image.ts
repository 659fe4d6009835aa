// The worker image: saved on Verda (`CONTAINER_CLI save`), streamed into Mello's
// worker-image.tar.gz through a temporary name (the old file is replaced only once the new one
// is complete), then sent to the cache bucket. Saved only when the image ID changed since the
// last backup, and only trusted as unchanged when Mello's copy and R2's object prove it.
import fs from 'node:fs';
import path from 'node:path';
import { IMAGE_FILE, commandToGzipFile } from './archive.ts';
import { humanSize, printable } from './cli.ts';
import { ensurePrivateDir, isRegularFile, readRegularFileSync, writeFileAtomic } from './files.ts';
import { FileDigests } from './hash-cache.ts';
import type { RunRecord } from './manifest.ts';
import type { Step } from './step.ts';
import { program } from './sh.ts';
import { said, type Host } from './ssh.ts';
import { fingerprintedSource, type Backend } from './storage.ts';

const IMAGE_ID_FILE = 'worker-image.id';
/** An image ID as docker (`sha256:` + 64 hex) and podman (64 hex) give it. */
const IMAGE_ID = /^(?:sha256:)?[0-9a-f]{64}$/;
const IMAGE_SHA_FILE = 'worker-image.sha256';

/**
 * The image last saved (worker-image.id) and the sha256 of its saved copy (worker-image.sha256,
 * in sha256sum's format). Either missing or damaged records nothing: the image is saved again.
 */
function readImageRecord(dir: string): { imageId: string; sha256: string } | undefined {
  try {
    const imageId = readRegularFileSync(path.join(dir, IMAGE_ID_FILE)).toString('utf8').trim();
    const sha256 = /^([0-9a-f]{64}) /.exec(readRegularFileSync(path.join(dir, IMAGE_SHA_FILE)).toString('utf8'))?.[1];
    return imageId && sha256 ? { imageId, sha256 } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * sha256 and size of Mello's copy of the image, by backup-verda's hash cache in the state dir
 * (read again only when its stat changed); restore-verda reads the same cache. `cacheWarning`:
 * the cache could not be saved, so it is hashed again next time (say it).
 */
export async function melloImageDigest(file: string, stateDir: string, signal: AbortSignal) {
  if (!isRegularFile(file)) return undefined;
  const digests = FileDigests.load(path.join(stateDir, 'hashes-backup-verda.json'));
  const st = fs.lstatSync(file, { bigint: true });
  const sha256 = await digests.sha256(file, st, signal);
  return { sha256, bytes: Number(st.size), cacheWarning: digests.trySave() };
}

export function imageStep(o: {
  host: Host;
  cli: string;
  image: string;
  dir: string;
  cacheBucket: Backend;
  bucket: string;
  record: RunRecord;
  /** Where Mello's hash cache of its own files lives (COMFYMULTI_STATE_DIR). */
  stateDir: string;
  skipReason?: string;
}): Step {
  const file = path.join(o.dir, IMAGE_FILE);
  return {
    name: 'Container image',
    moves: `${o.host.label}: ${o.cli} save ${o.image} → ${file} → ${o.cacheBucket.name}/${IMAGE_FILE}`,
    skipReason: o.skipReason,
    async run(ctx) {
      const inspect = await o.host.$({
        signal: ctx.signal,
        nothrow: true,
      })`sh -c ${program('image-id')} image-id ${o.cli} ${o.image}`;
      if (inspect.code === 127) throw new Error(`${o.cli} (CONTAINER_CLI) is not installed on ${o.host.label}`);
      if (inspect.code !== 0)
        throw new Error(
          `${o.cli} image inspect ${o.image} (CONTAINER_IMAGE) on ${o.host.label}: ${said(inspect.stderr)}`,
        );
      // What Verda says is data: an image ID is 64 hex digits (docker prefixes `sha256:`).
      const imageId = inspect.stdout.trim();
      if (!IMAGE_ID.test(imageId))
        throw new Error(
          `${o.cli} image inspect ${o.image} on ${o.host.label} did not give an image ID ` +
            `(${JSON.stringify(printable(imageId.slice(0, 80)))}): nothing saved or recorded`,
        );
      o.record.imageId = imageId;
      const short = imageId.replace(/^sha256:/, '').slice(0, 12);
      const recorded = readImageRecord(o.dir);
      const there = await o.cacheBucket.head(IMAGE_FILE, ctx.signal);
      const warnings: string[] = [];
      // Unchanged only when all three agree: the recorded ID is this image's, R2's object carries
      // it with the recorded bytes, and Mello's copy still holds them. A file that merely exists
      // is no proof: a bad save once stood there.
      if (
        recorded?.imageId === imageId &&
        there?.metadata['image-id'] === imageId &&
        there.metadata.sha256 === recorded.sha256
      ) {
        const local = await melloImageDigest(file, o.stateDir, ctx.signal);
        if (local?.cacheWarning) warnings.push(local.cacheWarning);
        if (local?.sha256 === recorded.sha256 && local.bytes === there.size) {
          o.record.artifact({ name: IMAGE_FILE, bytes: local.bytes, sha256: local.sha256 });
          o.record.object({
            bucket: o.bucket,
            key: IMAGE_FILE,
            bytes: there.size,
            sha256: local.sha256,
            action: 'skipped',
          });
          return { summary: `image ${short} unchanged since the last backup: not saved again` };
        }
        warnings.push(`${file} no longer holds the image recorded in ${IMAGE_SHA_FILE}: saved again`);
      }
      if (ctx.dryRun)
        return {
          summary: `would save image ${short} to ${file} and send it to ${o.cacheBucket.name}/${IMAGE_FILE}`,
          warnings,
        };
      ensurePrivateDir(o.dir);
      // gzip level 1: the image is gigabytes and Mello is a small VPS; speed over a few % of size.
      const saved = await commandToGzipFile(o.host, [o.cli, 'save', o.image], file, {
        signal: ctx.signal,
        level: 1,
        expectTar: true,
      });
      o.record.artifact({ name: IMAGE_FILE, bytes: saved.bytes, sha256: saved.sha256 });
      const progress = ctx.out.transfer(`${IMAGE_FILE} sent`);
      let sent = 0;
      await o.cacheBucket
        .put(IMAGE_FILE, fingerprintedSource(file, saved.fingerprint), {
          metadata: { sha256: saved.sha256, 'image-id': imageId },
          signal: ctx.signal,
          onBytes: (n) => progress.update({ bytes: (sent += n), total: saved.bytes }),
        })
        .finally(() => progress.end());
      o.record.object({
        bucket: o.bucket,
        key: IMAGE_FILE,
        bytes: saved.bytes,
        sha256: saved.sha256,
        action: 'uploaded',
      });
      // Recorded only once both copies are complete: the ID last.
      writeFileAtomic(path.join(o.dir, IMAGE_SHA_FILE), `${saved.sha256}  ${IMAGE_FILE}\n`, 0o600);
      writeFileAtomic(path.join(o.dir, IMAGE_ID_FILE), `${imageId}\n`, 0o600);
      return {
        summary: `${IMAGE_FILE}: image ${short} (${humanSize(saved.bytes)}), saved and sent`,
        bytes: saved.bytes,
        warnings,
      };
    },
  };
}
