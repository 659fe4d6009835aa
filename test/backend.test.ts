// The Backend conformance suite (backend-conformance.ts) on the in-memory backend and on
// R2Backend over a real S3 server (s3rver on loopback, taught R2's multipart abort and SigV4).
import { suite } from 'uvu';
import { MiB } from '../lib/files.ts';
import { R2Backend } from '../lib/r2.ts';
import { backendConformance } from './backend-conformance.ts';
import { SECRET, startS3, type S3Server } from './helpers.ts';
import { MemoryBackend } from './memory-backend.ts';

const memory = suite('memory backend');
backendConformance(memory, () => new MemoryBackend(), 11 * MiB);
memory.run();

const r2 = suite('R2Backend over s3rver');
let s3: S3Server;
let backend: R2Backend;
r2.before(async () => {
  s3 = await startS3(['conformance']);
  // Parts of 5 MiB (R2's smallest) so that the big case is three parts.
  backend = new R2Backend(
    { bucket: 'conformance', endpoint: s3.endpoint, accessKeyId: SECRET, secretAccessKey: SECRET },
    { multipartThreshold: 5 * MiB, partSize: 5 * MiB, backoffMs: 20 },
  );
});
r2.after(async () => {
  await s3.stop();
});
backendConformance(r2, () => backend, 11 * MiB);
r2.after.each(() => {
  // No multipart upload may be left open by any case.
  const open = s3.openUploads('conformance');
  if (open.length) throw new Error(`multipart uploads left open: ${open.join(', ')}`);
});
r2.run();
