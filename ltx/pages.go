package ltx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/superfly/ltx"
)

// Whole-database operations (snapshot, apply) move pages in batches, and
// checksum them on one goroutine while the codec compresses or decompresses
// on another: CRC-64 is most of their CPU time.

// batchPages is the number of pages in one batch.
const batchPages = 256

// pageBatch is a run of pages in one buffer, with their checksums. The
// buffer grows to the pages used, so small files stay small.
type pageBatch struct {
	pgnos []uint32
	data  []byte // page i at data[i*pageSize:]
	sums  []Checksum
}

// batchPool hands out a fixed number of reusable batches, so a fast
// producer cannot run far ahead of its consumer.
type batchPool chan *pageBatch

func newBatchPool(n int) batchPool {
	p := make(batchPool, n)
	for i := 0; i < n; i++ {
		p <- spareBatches.Get().(*pageBatch)
	}
	return p
}

// spareBatches keeps the batches of finished pools for later ones: a
// replica applies a small file per transaction, and batches made afresh
// for each cost more than decoding its pages.
var spareBatches = sync.Pool{New: func() any { return new(pageBatch) }}

// maxSpareBatch is the largest buffer a spare batch keeps: a snapshot's
// batches grow to batchPages pages, up to 16 MiB each.
const maxSpareBatch = 1 << 20

// release hands the pool's free batches to later pools. Call it once
// nothing gets or puts batches any more.
func (p batchPool) release() {
	for {
		select {
		case b := <-p:
			if cap(b.data) <= maxSpareBatch {
				spareBatches.Put(b)
			}
		default:
			return
		}
	}
}

// get waits for a free batch.
func (p batchPool) get(ctx context.Context) (*pageBatch, error) {
	select {
	case b := <-p:
		b.pgnos, b.sums = b.pgnos[:0], b.sums[:0]
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// page returns page i of the batch, growing the buffer to hold it.
func (b *pageBatch) page(i int, pageSize uint32) []byte {
	end := (i + 1) * int(pageSize)
	if end > len(b.data) {
		b.data = append(b.data, make([]byte, end-len(b.data))...)
	}
	return b.data[i*int(pageSize) : end]
}

// checksum computes the checksum of every page in the batch.
func (b *pageBatch) checksum(pageSize uint32) {
	hash := ltx.NewHasher()
	for i, pgno := range b.pgnos {
		b.sums = append(b.sums, ltx.ChecksumPageWithHasher(hash, pgno, b.page(i, pageSize)))
	}
}

// send passes b to out unless ctx ends first.
func send(ctx context.Context, out chan<- *pageBatch, b *pageBatch) error {
	select {
	case out <- b:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// readPages reads pages 1 to commit of db, all but the lock page, in
// batches with their checksums, and sends them to out in order.
func readPages(ctx context.Context, db io.ReaderAt, pageSize, commit uint32, pool batchPool, out chan<- *pageBatch) error {
	lockPgno := ltx.LockPgno(pageSize)
	for first := uint32(1); first <= commit; first += batchPages {
		n := min(batchPages, commit-first+1)
		b, err := pool.get(ctx)
		if err != nil {
			return err
		}
		b.page(int(n)-1, pageSize) // room for n pages
		if _, err := db.ReadAt(b.data[:n*pageSize], int64(first-1)*int64(pageSize)); errors.Is(err, io.EOF) {
			return fmt.Errorf("the database file ends before page %d of %d", first+n-1, commit)
		} else if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			pgno := first + i
			if pgno == lockPgno {
				continue
			}
			// Pages after the lock page move down one slot.
			if k := len(b.pgnos); k != int(i) {
				copy(b.page(k, pageSize), b.page(int(i), pageSize))
			}
			b.pgnos = append(b.pgnos, pgno)
		}
		b.checksum(pageSize)
		if err := send(ctx, out, b); err != nil {
			return err
		}
	}
	return nil
}

// writePages writes the pages of b to db, one write per run of consecutive
// page numbers.
func writePages(db io.WriterAt, b *pageBatch, pageSize uint32) error {
	for i := 0; i < len(b.pgnos); {
		j := i + 1
		for j < len(b.pgnos) && b.pgnos[j] == b.pgnos[j-1]+1 {
			j++
		}
		if _, err := db.WriteAt(b.data[i*int(pageSize):j*int(pageSize)], int64(b.pgnos[i]-1)*int64(pageSize)); err != nil {
			return err
		}
		i = j
	}
	return nil
}
