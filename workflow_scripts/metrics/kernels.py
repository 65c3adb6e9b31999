"""Every compiled (numba) loop of the metric stage, each a pass over plain arrays.

numba rather than numpy: scoring a query touches a few dozen labels in random order, which numpy could only do
with a dozen whole-array passes over (query × label) cells. All kernels release the GIL (`nogil`), so the two
neighbours files are scored on two threads, and are cached on disk (`cache`), so only the first run compiles.
"""

from __future__ import annotations

import numba
import numpy as np

# Bits of one model's recall key in a record's packed population inputs (`count_draws`).
KEY_BITS = 24


@numba.njit(nogil=True, cache=True)
def probe(hashes, shift, slots, sorted_hashes, order):  # pragma: no cover - compiled
    """StringIndex.positions of hashed strings: the bucket's two slots, else a binary search; −1 where not listed."""
    found = np.empty(len(hashes), np.int64)
    for i in range(len(hashes)):
        hash_ = hashes[i]
        bucket = np.intp(hash_ >> shift) if len(slots) else 0
        if len(slots) and slots[bucket, 0] == hash_:
            found[i] = slots[bucket, 1]
        elif len(slots) and slots[bucket, 2] == hash_:
            found[i] = slots[bucket, 3]
        else:
            at = np.searchsorted(sorted_hashes, hash_)
            found[i] = order[at] if at < len(sorted_hashes) and sorted_hashes[at] == hash_ else -1
    return found


# --- scoring queries: `score_queries` and the steps it runs per query ---


@numba.njit(nogil=True, cache=True)
def score_queries(
    bounds, rank, public, labels, truth, n_labels, n_public, k, top_n, counts
):  # pragma: no cover - compiled
    """Score queries 0..n−1, whose neighbour rows (rank, public record; ranks < k) are bounds[q]:bounds[q + 1].

    `labels` (offsets, codes) are the public records' label sets, `truth` (rows, offsets, codes) the queries':
    query q's objects are truth row rows[q]. Fills counts[:, :, q] = [n_predicted, n_correct] × [all, top_n].
    A public record listed twice by one query counts once, at its nearest rank. The top_n labels are the smallest
    `label_key`s (count descending, best rank ascending, label ascending).
    """
    count = np.zeros(n_labels, np.int32)
    best = np.full(n_labels, k, np.int32)  # k: not met (ranks are < k)
    listed_by = np.full(n_public, -1, np.int32)
    touched = np.empty(n_labels + 1, np.int32)  # one spare: every label is written, the new ones kept
    widest = 0
    for q in range(len(bounds) - 1):
        widest = max(widest, bounds[q + 1] - bounds[q])
    with_count = np.zeros(widest + 2, np.int32)  # the query's labels carried by c neighbours
    row_start, row_end = np.empty(widest, np.int64), np.empty(widest, np.int64)
    row_again = np.empty(widest, np.bool_)
    top_keys = np.empty(max(top_n, 1), np.int64)
    for q in range(len(bounds) - 1):
        first, end = bounds[q], bounds[q + 1]
        touched[n_labels] = gather_rows(first, end, q, public, labels, listed_by, row_start, row_end, row_again)
        n_touched = count_labels(first, end, rank, labels[1], row_start, row_end, row_again, count, best, touched)
        most = end - first + 1  # above every count: keys stay positive
        filled = top_labels(touched, n_touched, count, best, with_count, widest, most, k, n_labels, top_n, top_keys)
        cut = top_keys[filled - 1] if filled > 0 else -1
        correct, correct_top = count_correct(truth, q, count, best, most, k, n_labels, cut)
        counts[0, 0, q], counts[0, 1, q] = n_touched, filled
        counts[1, 0, q], counts[1, 1, q] = correct, correct_top
        for i in range(n_touched):  # clear what this query wrote, not the whole arrays
            label = touched[i]
            with_count[count[label]] = 0
            count[label] = 0
            best[label] = k


@numba.njit(nogil=True, cache=True)
def gather_rows(first, end, q, public, labels, listed_by, row_start, row_end, row_again):  # pragma: no cover
    """Each row's label range and whether its public record was met before in query q; returns a sum of loads.

    Its loads are independent of one another, so the CPU overlaps their cache misses; the label loop after it then
    finds its data in cache. The caller keeps the returned sum so the loads are not optimised away.
    """
    offsets, codes = labels
    touch = 0
    for row in range(first, end):
        p = public[row]
        start, stop = offsets[p], offsets[p + 1]
        row_start[row - first], row_end[row - first] = start, stop
        row_again[row - first] = listed_by[p] == q
        listed_by[p] = q
        if start < stop:
            touch += codes[start]
    return touch


@numba.njit(nogil=True, cache=True)
def count_labels(
    first, end, rank, codes, row_start, row_end, row_again, count, best, touched
):  # pragma: no cover - compiled
    """Count the neighbours carrying each label and its nearest rank; returns the labels met (listed in touched)."""
    n_touched = 0
    for i in range(end - first):
        r = rank[first + i]
        if not row_again[i]:
            for j in range(row_start[i], row_end[i]):  # branch-free: this loop is the hot one
                label = codes[j]
                c = count[label]
                touched[n_touched] = label
                n_touched += c == 0
                count[label] = c + 1
                best[label] = min(best[label], r)
        else:  # listed again: only a nearer rank matters
            for j in range(row_start[i], row_end[i]):
                best[codes[j]] = min(best[codes[j]], r)
    return n_touched


@numba.njit(nogil=True, cache=True)
def label_key(count, best, most, k, n_labels, label):  # pragma: no cover - compiled
    """One int64 per label, smaller for a better label: count descending, best rank, then label code."""
    return ((most - count) * (k + 1) + best) * n_labels + label


@numba.njit(nogil=True, cache=True)
def top_labels(
    touched, n_touched, count, best, with_count, widest, most, k, n_labels, top_n, top_keys
):  # pragma: no cover - compiled
    """The top_n smallest label keys, sorted, in top_keys; returns how many there are (fewer if fewer labels met).

    The top_n-th label's count, read from a histogram of counts, bounds the candidates, so most labels skip the
    sorted insertion.
    """
    for i in range(n_touched):
        with_count[count[touched[i]]] += 1
    cut_count, above = widest + 1, 0
    while cut_count > 1 and above + with_count[cut_count] < top_n:
        above += with_count[cut_count]
        cut_count -= 1
    filled = 0
    for i in range(n_touched):
        label = touched[i]
        if count[label] < cut_count:
            continue
        key = label_key(count[label], best[label], most, k, n_labels, label)
        if filled < top_n or key < top_keys[filled - 1]:
            at = min(filled, top_n - 1)
            while at > 0 and top_keys[at - 1] > key:
                top_keys[at] = top_keys[at - 1]
                at -= 1
            top_keys[at] = key
            filled = min(filled + 1, top_n)
    return filled


@numba.njit(nogil=True, cache=True)
def count_correct(truth, q, count, best, most, k, n_labels, cut):  # pragma: no cover - compiled
    """Query q's objects predicted in mode all, and in mode top_n (key at most `cut`, the last top key)."""
    rows, offsets, codes = truth
    correct, correct_top = 0, 0
    for j in range(offsets[rows[q]], offsets[rows[q] + 1]):
        label = codes[j]
        if count[label] > 0:
            correct += 1
            if label_key(count[label], best[label], most, k, n_labels, label) <= cut:
                correct_top += 1
    return correct, correct_top


# --- selecting a chunk's rows, counting bootstrap draws, summing sample-level gaps ---


@numba.njit(nogil=True, cache=True)
def select_rows(run_start, listed, rank, k, row_public, public_row, kept_rank):  # pragma: no cover - compiled
    """The rows of rank < k of the listed runs (runs of queries of the query list) in one pass.

    Writes each kept row's public record (row_public: of every row, −1 where not a public id) and rank into
    public_row and kept_rank; returns the kept rows' bounds per listed run and the rank-0 row of each listed run
    (−1 if none; the last if several).
    """
    n_rows = len(rank)
    n_listed = 0
    for j in range(len(run_start)):
        n_listed += listed[j]
    bounds = np.zeros(n_listed + 1, np.int64)
    nearest = np.full(n_listed, -1, np.int64)
    kept, at = 0, 0
    for j in range(len(run_start)):
        if not listed[j]:
            continue
        for row in range(run_start[j], run_start[j + 1] if j + 1 < len(run_start) else n_rows):
            if rank[row] < k:
                public_row[kept] = row_public[row]
                kept_rank[kept] = rank[row]
                if rank[row] == 0:
                    nearest[at] = row
                kept += 1
        at += 1
        bounds[at] = kept
    return bounds, nearest


@numba.njit(nogil=True, cache=True)
def count_draws(resample, record, packed, sign_counts, n_target, n_reference):  # pragma: no cover - compiled
    """Add draw i (record[i] of resample resample[i]) to its resample's counts of sign codes and, per model, of
    recall keys; a record's inputs are one int64 of `packed` (one memory read per draw)."""
    key_mask = (1 << KEY_BITS) - 1
    for i in range(len(record)):
        b, inputs = resample[i], packed[record[i]]
        sign_counts[b, inputs & 31] += 1
        n_target[b, (inputs >> 5) & key_mask] += 1
        n_reference[b, inputs >> (5 + KEY_BITS)] += 1


@numba.njit(nogil=True, cache=True)
def block_sum(block):  # pragma: no cover - compiled
    """numpy's sum of at most 128 float64s (pairwise_sum's leaf): eight interleaved accumulators, then the rest."""
    n = len(block)
    if n < 8:
        total = 0.0
        for i in range(n):
            total += block[i]
        return total
    partial = block[:8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            partial[j] += block[i + j]
        i += 8
    total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + (
        (partial[4] + partial[5]) + (partial[6] + partial[7])
    )
    while i < n:
        total += block[i]
        i += 1
    return total


@numba.njit(nogil=True, cache=True)
def sparse_pairwise_sum(positions, values, n):  # pragma: no cover - compiled
    """numpy's pairwise sum of n terms that are zero but for `values` at `positions` (ascending): the same halving
    into blocks of at most 128, each block summed as numpy does. A zero term changes no partial sum but a zero's
    sign, which the reduction's initial +0.0 clears at the end. Iterative (numba's cache cannot load recursive
    functions): a stack of the halves still to sum, and of the sums of the halves done."""
    first_of = np.empty(128, np.int64)
    n_of = np.empty(128, np.int64)
    stage = np.empty(128, np.int64)  # 0: not started, 1: left half summed, 2: both halves summed
    sums = np.empty(128)
    depth, n_sums = 1, 0
    first_of[0], n_of[0], stage[0] = 0, n, 0
    while depth:
        first, size = first_of[depth - 1], n_of[depth - 1]
        half = size // 2
        half -= half % 8
        if stage[depth - 1] == 0:
            at = np.searchsorted(positions, first)
            if at == len(positions) or positions[at] >= first + size or size <= 128:
                block = np.zeros(size if size <= 128 else 0)
                while size <= 128 and at < len(positions) and positions[at] < first + size:
                    block[positions[at] - first] = values[at]
                    at += 1
                sums[n_sums] = block_sum(block)
                n_sums += 1
                depth -= 1
            else:
                stage[depth - 1] = 1
                first_of[depth], n_of[depth], stage[depth] = first, half, 0
                depth += 1
        elif stage[depth - 1] == 1:
            stage[depth - 1] = 2
            first_of[depth], n_of[depth], stage[depth] = first + half, size - half, 0
            depth += 1
        else:
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            depth -= 1
    return sums[0]


@numba.njit(nogil=True, cache=True)
def counted_aucg(n_target, n_reference, distinct, size, out):  # pragma: no cover - compiled
    """out[b] = `aucg` of resample b (`size` records), given how many of its records have each recall key per model.

    aucg stably sorts the pooled recalls (target first): key by key, ascending, the target's records, then the
    reference's, each moving the CDF gap by a jump. Its terms are gap × width to the next value: 0 inside a key,
    and for the last record of a key the width to the next key met (1 after the last). So the running gap is
    summed jump by jump as aucg's cumsum does, and numpy's pairwise sum of the 2·size terms taken over the non-zero
    ones (`sparse_pairwise_sum`): the very float, without an array of 2·size terms.
    """
    target_jump, reference_jump = -1.0 / size, 1.0 / size
    positions = np.empty(len(distinct), np.int64)
    values = np.empty(len(distinct))
    for b in range(n_target.shape[0]):
        cdf_gap, at, n_terms, key = 0.0, 0, 0, 0
        while key < len(distinct):
            if n_target[b, key] + n_reference[b, key] == 0:
                key += 1
                continue
            for _ in range(n_target[b, key]):
                cdf_gap += target_jump
            for _ in range(n_reference[b, key]):
                cdf_gap += reference_jump
            at += n_target[b, key] + n_reference[b, key]
            following = key + 1
            while following < len(distinct) and n_target[b, following] + n_reference[b, following] == 0:
                following += 1
            next_value = distinct[following] if following < len(distinct) else 1.0
            positions[n_terms] = at - 1
            values[n_terms] = cdf_gap * (next_value - distinct[key])
            n_terms += 1
            key = following
        out[b] = 0.0 + sparse_pairwise_sum(positions[:n_terms], values[:n_terms], at)


@numba.njit(nogil=True, cache=True)
def running_sums(gaps, sums, state, cutoffs, at_cutoffs):  # pragma: no cover - compiled
    """Add each row of `gaps` ([rows, 3], in order) to `sums`, one at a time (as a cumulative sum does); after the
    L-th row overall (state: [rows added, next cutoff]) of each L in `cutoffs` (ascending), copy the sums."""
    for i in range(gaps.shape[0]):
        for m in range(gaps.shape[1]):
            sums[m] += gaps[i, m]
        state[0] += 1
        while state[1] < len(cutoffs) and cutoffs[state[1]] == state[0]:
            at_cutoffs[state[1]] = sums
            state[1] += 1
