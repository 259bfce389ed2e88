package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/ltx"
)

// SQLite's rollback journal starts with this magic once it is hot.
var journalMagic = []byte{0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7}

// minPageSize is SQLite's smallest page size: it writes the database file
// only in whole pages, so in multiples of this at offsets aligned to it.
const minPageSize = 512

// errNotPages refuses a write to a database file that SQLite would never
// make, which could only tear pages.
var errNotPages = errors.New("not a write of whole database pages")

// span is a byte range [off, end) of a file.
type span struct{ off, end int64 }

// writeDatabase writes data at off in the database file through f.
// Caller holds d.mu.
func (d *DB) writeDatabase(f *os.File, data []byte, off int64) (int, error) {
	if off%minPageSize != 0 || len(data)%minPageSize != 0 {
		return 0, fmt.Errorf("%w: %d bytes at offset %d", errNotPages, len(data), off)
	}
	// A checkpoint must not put transactions in the database file before
	// they are in the log, durably: recovery reads the database file plus
	// the WAL from the log's position, and a power failure may empty LTX
	// files never fsynced while the kernel has written these pages.
	if err := d.scanWAL(context.Background()); err != nil {
		return 0, err
	}
	if err := d.drain(); err != nil {
		return 0, err
	}
	if d.walActive() {
		if err := d.syncLog(context.Background()); err != nil {
			return 0, err
		}
	}
	if len(d.dirty) == 0 && d.unjournaled() {
		return 0, errNoJournal
	}
	d.keepFileRange(off, off+int64(len(data)))
	n, err := f.WriteAt(data, off)
	if n > 0 {
		d.addDirty(span{off, off + int64(n)})
	}
	return n, err
}

// errNoJournal refuses the writes of journal_mode=MEMORY and OFF. No file
// marks such a transaction's end, and nothing can roll back one cut short
// (a writer killed half-way leaves half its pages in the database file):
// the log would take it as committed.
var errNoJournal = errors.New("journal_mode=MEMORY and OFF are not supported: a transaction cut short could not be told from a committed one")

// unjournaled reports whether SQLite is writing the database file without
// a rollback journal: a writer holds EXCLUSIVE, the file is not in WAL
// mode and no journal exists. In DELETE, TRUNCATE and PERSIST modes SQLite
// creates the journal before it writes the database file; checkpoints in
// WAL mode write it without one, and so does a program copying a database
// in (cp), which takes no lock. With kernel locks the mount sees no lock
// and cannot tell. Caller holds d.mu.
func (d *DB) unjournaled() bool {
	if _, exclusive := d.Locks.Test(0, syscall.F_RDLCK, sharedFirst, sharedFirst+sharedSize-1); !exclusive {
		return false
	}
	if walMode(d.file) {
		return false
	}
	return !d.journalExists()
}

func (d *DB) addDirty(s span) {
	d.hasDirty.Store(true)
	d.dirtyGen++
	if k := len(d.dirty); k > 0 && d.dirty[k-1].end == s.off {
		d.dirty[k-1].end = s.end
		return
	}
	d.dirty = append(d.dirty, s)
}

// clearDirty forgets the recorded writes. Caller holds d.mu.
func (d *DB) clearDirty() {
	d.dirty = d.dirty[:0]
	d.hasDirty.Store(false)
	if d.prepared != nil {
		d.prepared.Abort()
		d.prepared = nil
	}
}

// writeJournal writes data at off in the rollback journal through f. A
// zeroed header ends a transaction in PERSIST mode (and in exclusive
// locking mode): the transaction is committed to the log first.
// Caller holds d.mu.
func (d *DB) writeJournal(ctx context.Context, f *os.File, data []byte, off int64) (int, error) {
	if off == 0 && len(data) >= len(journalMagic) && binary.BigEndian.Uint64(data) == 0 {
		if err := d.commitRollback(ctx); err != nil {
			return 0, err
		}
	}
	return f.WriteAt(data, off)
}

// endJournal is called before the journal is deleted or truncated to zero,
// the commit point of DELETE and TRUNCATE modes. Caller holds d.mu.
func (d *DB) endJournal(ctx context.Context) error { return d.commitRollback(ctx) }

// unlocked is called after a lock on the database file is released. A
// program that wrote the database file without a journal (a copy made
// under SQLite's locks; SQLite's own journal_mode=MEMORY and OFF are
// refused, see unjournaled) has made its change when it gives up its
// lock. Caller holds d.mu.
func (d *DB) unlocked(ctx context.Context) error {
	if len(d.dirty) == 0 || d.walActive() {
		return nil
	}
	if d.Locks.Held(reservedByte, reservedByte) {
		return nil // a writer is still in its transaction
	}
	if _, ok := d.Locks.Test(0, syscall.F_RDLCK, sharedFirst, sharedFirst+sharedSize-1); ok {
		return nil // a writer holds EXCLUSIVE
	}
	if _, err := os.Lstat(d.path(journalFile)); err == nil {
		return nil // the journal decides
	}
	return d.commitRollback(ctx)
}

// commitRollback records the pages written to the database file since the
// last commit as one transaction, unless they were written back unchanged
// (a rollback). Its LTX file may have been prepared when SQLite fsynced
// the database file. Caller holds d.mu.
func (d *DB) commitRollback(ctx context.Context) error {
	if len(d.dirty) == 0 {
		return nil
	}
	if err := d.drain(); err != nil {
		return err
	}
	if p := d.prepared; p != nil && d.preparedGen == d.dirtyGen {
		d.prepared = nil
		cs := d.beginCommit(time.Now())
		info, err := p.Commit()
		d.endCommit(cs, d.dirtyPages(info), info)
		if err == nil {
			d.committedRollback(info)
			return nil
		}
		d.logger.Warn("prepared LTX file not committed; writing it again", "err", err)
	}
	tx, ok, err := d.rollbackTx()
	if err != nil || !ok {
		return err
	}
	cs := d.beginCommit(time.Now())
	info, err := d.log.Commit(ctx, tx)
	d.endCommit(cs, d.dirtyPages(info), info)
	if err != nil {
		return err
	}
	d.committedRollback(info)
	return nil
}

// committedRollback records that the pages written since the last commit
// are in the log as info, or were unchanged if info is nil. Caller holds
// d.mu.
func (d *DB) committedRollback(info *ltx.FileInfo) {
	d.clearDirty()
	if info != nil {
		d.committed = commitMark{d.committed.n + 1, info.Header.MaxTXID}
		d.pageSize = info.Header.PageSize
		d.logger.Debug("commit", "txid", info.Header.MaxTXID, "commit", info.Header.Commit, "bytes", info.Size)
	}
}

// rollbackTx describes the transaction made of the pages written to the
// database file since the last commit; ok is false if the file is empty
// (nothing to record). Caller holds d.mu.
func (d *DB) rollbackTx() (tx ltx.Tx, ok bool, err error) {
	fi, err := d.file.Stat()
	if err != nil {
		return tx, false, err
	}
	if fi.Size() == 0 {
		d.clearDirty()
		return tx, false, nil
	}
	pageSize, commit, err := databaseSize(d.file, fi.Size())
	if err != nil {
		return tx, false, fmt.Errorf("database %s: %w", d.Name, err)
	}
	var pgnos []uint32
	ps := int64(pageSize)
	for _, s := range d.dirty {
		for p := s.off / ps; p*ps < s.end; p++ {
			pgnos = append(pgnos, uint32(p+1))
		}
	}
	return ltx.Tx{
		DB:            d.file,
		PageSize:      pageSize,
		Commit:        commit,
		Pgnos:         pgnos,
		SkipUnchanged: true,
		// The file is fsynced before SQLite's commit point (the journal's
		// deletion); the directory is not, as SQLite does not fsync it
		// after deleting the journal under synchronous=FULL. Under EXTRA
		// it does, and FsyncDir syncs the log's directory then.
		NoSyncDir: true,
	}, true, nil
}

// syncDatabase fsyncs the database file through f, as SQLite asks once it
// has written a transaction's pages and before it deletes (or truncates,
// or zeroes) the journal. In a rollback-journal mode the transaction's LTX
// file is written and fsynced meanwhile, to be renamed into the log at the
// commit point; if the transaction goes on writing instead, it is written
// again then. Caller does not hold d.mu.
func (d *DB) syncDatabase(f *os.File, datasync bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var (
		wg       sync.WaitGroup
		prepared *ltx.Prepared
		perr     error
	)
	if d.prepared != nil && d.preparedGen != d.dirtyGen {
		d.prepared.Abort()
		d.prepared = nil
	}
	if d.prepared == nil && len(d.dirty) > 0 && !d.walActive() && d.journalExists() && d.drain() == nil {
		if tx, ok, err := d.rollbackTx(); err == nil && ok {
			gen := d.dirtyGen
			wg.Go(func() { prepared, perr = d.log.Prepare(context.Background(), tx) })
			defer func() {
				if prepared != nil {
					d.prepared, d.preparedGen = prepared, gen
				}
			}()
		}
	}
	var err error
	if datasync {
		err = syscall.Fdatasync(int(f.Fd()))
	} else {
		err = f.Sync()
	}
	wg.Wait()
	if err == nil && d.wal.passthrough && d.walActive() {
		// The end of a checkpoint: once SQLite has recorded it, it may
		// restart the WAL, which passthrough does not show the daemon.
		if err = d.scanWAL(context.Background()); err == nil {
			if err = d.drain(); err == nil {
				err = d.syncLog(context.Background())
			}
		}
	}
	if perr != nil {
		d.logger.Debug("prepare LTX file at the database's fsync", "err", perr)
	}
	return err
}

// journalExists reports whether the database has a rollback journal.
func (d *DB) journalExists() bool {
	_, err := os.Lstat(d.path(journalFile))
	return err == nil
}
