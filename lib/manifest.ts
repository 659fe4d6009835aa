// The manifest of a backup-verda run, written last, and --verify built on it: the newest
// manifest's artifacts against their bytes and sha256 (and that the archives list), and its R2
// objects against the sha256 of their sources, recorded when they were sent. Needs no Verda:
// verify still works once the instance is gone.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Artifact } from './archive.ts';
import { listArchive } from './archive.ts';
import { errorText } from './cli.ts';
import { hashFile } from './hash-cache.ts';
import type { Step } from './plan.ts';
import { newestLocal } from './rotation.ts';
import type { Backend } from './storage.ts';
import { printable } from './sync.ts';

/** An R2 object of the run. */
export interface R2Record {
  bucket: string;
  key: string;
  bytes: number;
  sha256: string;
  action: 'uploaded' | 'skipped';
}

export interface Manifest {
  version: 1;
  script: string;
  timestamp: string;
  mode: 'full' | 'quick';
  verdaHost: string;
  imageId?: string;
  complete: boolean;
  failedSteps: string[];
  artifacts: Artifact[];
  r2: R2Record[];
}

function readNewest(dir: string): { file: string; manifest: Manifest } {
  const file = newestLocal(dir, 'manifest', 'json');
  if (!file) throw new Error(`no manifest-*.json in ${dir}: nothing to verify`);
  try {
    return { file, manifest: JSON.parse(fs.readFileSync(file, 'utf8')) as Manifest };
  } catch (e) {
    throw new Error(`${file} is not readable JSON: ${errorText(e)}`);
  }
}

/** Each artifact of the newest manifest: present, same bytes and sha256, archives list whole. */
export function verifyArtifactsStep(dir: string): Step {
  return {
    name: 'Local artifacts against the newest manifest',
    moves: `${dir}/manifest-*.json → ${dir}`,
    async run(ctx) {
      const { file, manifest } = readNewest(dir);
      const failures: string[] = [];
      for (const a of manifest.artifacts) {
        const p = path.join(dir, a.name);
        if (!fs.existsSync(p)) {
          failures.push(`missing: ${a.name}`);
          continue;
        }
        const size = fs.statSync(p).size;
        if (size !== a.bytes) {
          failures.push(`differs: ${a.name} has ${size} bytes, the manifest says ${a.bytes}`);
          continue;
        }
        if ((await hashFile(p, ctx.signal)) !== a.sha256) {
          failures.push(`differs: ${a.name} sha256 is not the manifest's`);
          continue;
        }
        if (a.name.endsWith('.tar.gz')) {
          await listArchive(p).catch((e) => failures.push(`damaged: ${a.name} does not list as an archive (${errorText(e)})`));
        }
      }
      const warnings = manifest.complete ? [] : [`${path.basename(file)} records an incomplete run: ${manifest.failedSteps.join(', ')} failed`];
      return { summary: `${manifest.artifacts.length - failures.length} of ${manifest.artifacts.length} artifacts of ${path.basename(file)} whole`, failures, warnings };
    },
  };
}

/**
 * Each R2 object of the newest manifest: present with its size, and its `sha256` metadata the
 * source's. With `deep`, its bytes are read back and hashed. An object without metadata (a
 * bash-era upload adopted by ETag) is checked by size, or with `deep` by its bytes.
 */
export function verifyObjectsStep(dir: string, backends: Map<string, Backend>, deep: boolean): Step {
  return {
    name: `R2 objects against the sources' sha256${deep ? ' (reading every byte back)' : ''}`,
    moves: `${dir}/manifest-*.json → ${[...backends.values()].map((b) => b.name).join(', ')}`,
    async run(ctx) {
      const { manifest } = readNewest(dir);
      const failures: string[] = [];
      let sizeOnly = 0;
      let checked = 0;
      const records = manifest.r2.filter((o) => o.sha256);
      let next = 0;
      const worker = async () => {
        while (next < records.length) {
          const o = records[next++];
          const backend = backends.get(o.bucket);
          const name = `r2://${o.bucket}/${printable(o.key)}`;
          if (!backend) {
            failures.push(`${name}: bucket not configured here`);
            continue;
          }
          const head = await backend.head(o.key, ctx.signal);
          if (!head) failures.push(`missing: ${name}`);
          else if (head.size !== o.bytes) failures.push(`differs: ${name} has ${head.size} bytes, the source ${o.bytes}`);
          else if (head.metadata.sha256 && head.metadata.sha256 !== o.sha256) failures.push(`differs: ${name} sha256 metadata is not the source's`);
          else if (deep) {
            const hash = crypto.createHash('sha256');
            await pipeline(await backend.get(o.key, ctx.signal), hash);
            if (hash.digest('hex') !== o.sha256) failures.push(`differs: ${name} bytes read back are not the source's`);
          } else if (!head.metadata.sha256) sizeOnly++;
          checked++;
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      const warnings = sizeOnly ? [`${sizeOnly} objects have no sha256 metadata (bash-era uploads): checked by size only; --deep reads them back`] : [];
      return { summary: `${records.length - failures.length} of ${records.length} objects match their sources`, failures, warnings, data: { checked } };
    },
  };
}
