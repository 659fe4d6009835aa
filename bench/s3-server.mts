// The benchmarks' S3 server, in a process of its own so the tools under test do not share its
// event loop with the harness. Prints its endpoint, then logs one line per request to the file
// named by its first argument (the harness counts requests between runs). Started with
// --openssl-legacy-provider: s3rver's continuation tokens use DES.
import fs from 'node:fs';
import { startS3 } from '../test/helpers.ts';

const log = fs.createWriteStream(process.argv[2]);
const buckets = process.argv.slice(3);
const s3 = await startS3(buckets, { onRequest: (r) => log.write(`${r.method} ${r.url}\n`) });
process.stdout.write(`${s3.endpoint}\n`);
const stop = async () => {
  await s3.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
