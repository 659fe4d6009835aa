// `node --openssl-legacy-provider --import tsx bench/listing.mts`: how long the S3 server takes to
// list 2,000 keys, one page after the other and in parallel (key ranges, per directory). It is
// the floor under an unchanged rerun of 2,000 small files; the README's benchmark section cites it.
import { ListObjectsV2Command, PutObjectCommand, type ListObjectsV2CommandInput } from '@aws-sdk/client-s3';
import { startS3 } from '../test/helpers.ts';

const s3 = await startS3(['listing']);
const dirs = 20;
const keys = Array.from(
  { length: 2000 },
  (_, i) => `outputs/user${String(i % dirs).padStart(3, '0')}/img_${String(i).padStart(5, '0')}.bin`,
).sort();
for (let i = 0; i < keys.length; i += 50) {
  await Promise.all(
    keys
      .slice(i, i + 50)
      .map((Key) => s3.client.send(new PutObjectCommand({ Bucket: 'listing', Key, Body: 'x'.repeat(100) }))),
  );
}
const page = (o: Partial<ListObjectsV2CommandInput>) =>
  s3.client.send(new ListObjectsV2Command({ Bucket: 'listing', Prefix: 'outputs/', ...o }));
const count = (pages: { KeyCount?: number }[]) => pages.reduce((n, p) => n + (p.KeyCount ?? 0), 0);

const ways: [string, () => Promise<number>][] = [
  [
    'pages one after the other',
    async () => {
      const pages = [];
      let token: string | undefined;
      do {
        const p = await page({ ContinuationToken: token });
        pages.push(p);
        token = p.IsTruncated ? p.NextContinuationToken : undefined;
      } while (token);
      return count(pages);
    },
  ],
  ...[2, 4, 8].map((n): [string, () => Promise<number>] => [
    `${n} key ranges at once`,
    async () => {
      const per = keys.length / n;
      return count(
        await Promise.all(
          Array.from({ length: n }, (_, i) => page({ StartAfter: i ? keys[i * per - 1] : undefined, MaxKeys: per })),
        ),
      );
    },
  ]),
  [
    `${dirs} directories at once`,
    async () =>
      count(
        await Promise.all(
          Array.from({ length: dirs }, (_, i) => page({ Prefix: `outputs/user${String(i).padStart(3, '0')}/` })),
        ),
      ),
  ],
];
try {
  for (const [name, list] of ways) {
    const times: string[] = [];
    for (let run = 0; run < 3; run++) {
      const started = performance.now();
      const n = await list();
      if (n !== keys.length) throw new Error(`${name}: listed ${n} keys, not ${keys.length}`);
      times.push(`${Math.round(performance.now() - started)} ms`);
    }
    console.log(`${name}: ${times.join(', ')}`);
  }
} finally {
  await s3.stop();
}
