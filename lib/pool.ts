// The one worker pool: files of a sync, parts of an upload, objects of a verify.

/**
 * Runs `work` on every item, at most `concurrency` at once, taking items in order. The first
 * error stops new items from being taken; the items in flight are let finish (an upload aborts
 * itself at the server before it settles), then that first error is thrown. So when `pool`
 * returns or throws, nothing it started is still running.
 */
export async function pool<T>(
  items: Iterable<T> | AsyncIterable<T>,
  concurrency: number,
  work: (item: T) => Promise<void>,
  signal?: AbortSignal,
): Promise<void> {
  const source =
    Symbol.asyncIterator in items ? items[Symbol.asyncIterator]() : (items as Iterable<T>)[Symbol.iterator]();
  let failure: { error: unknown } | undefined;
  // Items are taken one at a time even from an async source: workers share one iterator.
  let taking: Promise<unknown> = Promise.resolve();
  const next = async (): Promise<IteratorResult<T>> => {
    const turn = taking.then(() => source.next());
    taking = turn.catch(() => {});
    return turn;
  };
  const worker = async () => {
    while (!failure && !signal?.aborted) {
      const it = await next();
      if (it.done) return;
      try {
        await work(it.value);
      } catch (e) {
        failure ??= { error: e };
      }
    }
  };
  const workers = Array.from({ length: Math.max(1, concurrency) }, () =>
    worker().catch((e) => (failure ??= { error: e })),
  );
  await Promise.all(workers);
  if (failure) throw failure.error;
  if (signal?.aborted) throw signal.reason;
}
