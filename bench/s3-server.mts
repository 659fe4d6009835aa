// The benchmarks' S3 server (s3rver), in a process of its own so that neither the tools under
// test nor the WAN proxy share its event loop. Creates the buckets named as arguments, prints its
// endpoint, and removes its data on SIGTERM. Started with --openssl-legacy-provider: s3rver's
// continuation tokens use DES, and any listing past 1,000 keys needs one.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import type { Readable } from 'node:stream';
import { startS3 } from '../test/helpers.ts';

// s3rver writes a PutObject body held in a Buffer (as test/s3rver-fixes.ts makes it) with
// writeStream.end() and answers before the bytes are on disk: rclone's HEAD right after a 20 MB+
// PUT saw a short object and failed the copy as "corrupted on transfer". Here the body is on disk
// before the answer. (Still whole-body-or-nothing, as the fixes want.)
type Store = { getResourcePath(b: string, k: string, r: string): string; putMetadata(...a: unknown[]): Promise<void> };
type Put = { bucket: string; key: string; content: Readable | Buffer; metadata: Record<string, string> };
const FilesystemStore = createRequire(import.meta.url)('s3rver/lib/stores/filesystem.js');
FilesystemStore.prototype.putObject = async function (this: Store, object: Put) {
  let body = object.content;
  if (!Buffer.isBuffer(body)) {
    const chunks: Buffer[] = [];
    for await (const chunk of body) chunks.push(chunk as Buffer);
    if ((body as { complete?: boolean }).complete === false) throw new Error('request body cut short');
    body = Buffer.concat(chunks);
  }
  const file = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.promises.mkdir(file.slice(0, file.lastIndexOf('/')), { recursive: true });
  await fs.promises.writeFile(file, body);
  const md5 = crypto.createHash('md5').update(body).digest('hex');
  await this.putMetadata(object.bucket, object.key, object.metadata, md5);
  return { size: body.length, md5 };
};

const s3 = await startS3(process.argv.slice(2));
process.stdout.write(`${s3.endpoint}\n`);
const stop = async () => {
  await s3.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
