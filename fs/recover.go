package fs

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"

	_ "github.com/mattn/go-sqlite3" // SQLite itself rolls back hot journals

	"github.com/meridian-db/meridian/internal/durable"
	"github.com/meridian-db/meridian/ltx"
)

// recover brings database d to a state where its file and its log agree,
// then opens the log. It handles what a crash of the daemon or of an app
// can leave behind:
//
//   - a hot rollback journal whose transaction the log already holds (the
//     daemon died after writing the LTX file, before the journal was
//     finalized): the journal is removed, completing the commit;
//   - any other hot journal: SQLite rolls it back;
//   - WAL transactions the log does not hold (their LTX files were never
//     written, or not synced and lost): they are added to the log from the
//     WAL.
//
// The log then checks the database's checksum against its position; a
// mismatch fails with *ltx.DatabaseMismatchError and nothing is served.
func (d *DB) recover(ctx context.Context) error {
	file, err := os.OpenFile(d.path(databaseFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	d.file = file
	files, err := d.loggedFiles(ctx)
	if err != nil {
		return err
	}
	var last ltx.FileInfo
	if len(files) > 0 {
		last = files[len(files)-1]
	}
	if err := d.recoverJournal(last.Pos()); err != nil {
		return err
	}
	if err := d.openWALFile(); err != nil {
		return err
	}
	txs, err := d.readWALFile()
	if err != nil {
		return err
	}
	if err := d.readWALAppliedMark(); err != nil {
		return err
	}
	if d.walApplied() {
		// Frames the applier of a replica wrote: their transactions are
		// in the log already, but for those of groups whose records a
		// power cut lost while their frames survived (the two are written
		// at once, see ltx.ApplyOptions.Overlap): those are dropped, and
		// come again from the primary. Into the database file with the
		// rest, before anything reads it.
		// Only a reboot loses what the page cache held: a daemon that
		// merely crashed keeps every frame and record, and is spared
		// reading the database file once more.
		keep := len(txs)
		if d.rebootedSinceApplied() {
			if keep, err = d.appliedInLog(txs, files); err != nil {
				return fmt.Errorf("read the WAL the replica wrote: %w", err)
			}
		}
		if keep < len(txs) {
			d.logger.Warn("the WAL the replica wrote holds transactions its log lost in a crash; dropped them, the primary sends them again",
				"dropped", len(txs)-keep, "log_pos", last.Pos())
		}
		d.setCommitted(txs[:keep])
		pgnos, err := d.foldWAL(false)
		if err != nil {
			return fmt.Errorf("copy the WAL the replica wrote into the database file: %w", err)
		}
		d.logger.Info("copied the WAL the replica wrote into the database file", "transactions", keep, "pages", len(pgnos))
		txs = nil
	} else if err := os.Remove(d.path(walAppliedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	logged := d.loggedWALTxs(txs, last.Header)
	d.setCommitted(txs[:logged])
	if err := d.log.Open(ctx); err != nil {
		return err
	}
	d.pageSize = last.Header.PageSize
	for _, wtx := range txs[logged:] {
		tx := d.newWALCommit(wtx.first, wtx.last, wtx.commit, wtx.frames)
		if err := d.logWALTx(ctx, tx); err != nil {
			return fmt.Errorf("add WAL transaction to the log: %w", err)
		}
		d.loggedWALTx(tx)
		d.wal.mxFrame = wtx.last + 1
	}
	if n := len(txs) - logged; n > 0 {
		if err := d.syncLog(ctx); err != nil {
			return err
		}
		d.logger.Info("recovered WAL transactions into the log", "count", n, "pos", d.log.Pos())
	}
	return nil
}

// loggedFiles returns the log's files, read with the log alone, before
// the database is involved.
func (d *DB) loggedFiles(ctx context.Context) ([]ltx.FileInfo, error) {
	l := ltx.NewLog(d.Name, d.path(logDir), "")
	l.Logger = d.log.Logger
	l.MayBeUnsynced = d.currentWALFiles()
	if err := l.Open(ctx); err != nil {
		return nil, err
	}
	defer func() { _ = l.Close() }()
	return l.Files(), nil
}

// appliedInLog returns how many of txs, the transactions of a WAL the
// applier of a replica wrote, to keep: the most after which the database
// is where one of the log's files left it, by its checksum and size. A
// power cut may keep frames of the last groups applied while losing
// their records in the log (see ltx.ApplyOptions.Overlap), which this
// cuts off. If no transaction leaves the database where a file left it,
// it keeps them all: a database behind its log, whose Open applies the
// files after it again. Caller holds d.mu.
func (d *DB) appliedInLog(txs []walTx, files []ltx.FileInfo) (int, error) {
	if len(txs) == 0 || len(files) == 0 {
		return len(txs), nil
	}
	type state struct {
		sum   ltx.Checksum
		pages uint32
	}
	states := make(map[state]bool, len(files))
	for _, f := range files {
		states[state{f.PostApplyChecksum, f.Header.Commit}] = true
	}
	t, err := ltx.ReadChecksumTable(d.path(databaseFile))
	if err != nil {
		return 0, err
	}
	if t.PageSize() == 0 {
		t = ltx.NewChecksumTable(d.wal.hdr.pageSize)
	}
	keep := -1
	for i, tx := range txs {
		pages := make(map[uint32][]byte, len(tx.frames))
		for pgno, off := range tx.frames {
			page := make([]byte, d.wal.hdr.pageSize)
			if _, err := d.wal.file.ReadAt(page, off+walFrameHeaderSize); err != nil {
				return 0, fmt.Errorf("read the frame of page %d at %d: %w", pgno, off, err)
			}
			pages[pgno] = page
		}
		t.Commit(pages, tx.commit)
		if states[state{t.Checksum(), t.Pages()}] {
			keep = i + 1
		}
	}
	if keep < 0 {
		return len(txs), nil
	}
	return keep, nil
}

// currentWALFiles returns a test of whether an LTX file holds a
// transaction of the backing WAL's current generation. Such a file may
// never have been fsynced (the log is synced before a checkpoint writes
// the database and before the WAL restarts), and its frames are still in
// the WAL, from which recovery writes it again. It returns nil without a
// WAL.
func (d *DB) currentWALFiles() func(ltx.Header) bool {
	f, err := os.Open(d.path(walFile))
	if err != nil {
		return nil
	}
	defer func() { _ = f.Close() }()
	var b [walHeaderSize]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		return nil
	}
	wh, err := parseWALHeader(b[:])
	if err != nil {
		return nil
	}
	return func(h ltx.Header) bool {
		return h.WALOffset != 0 && h.WALSalt1 == wh.salt1 && h.WALSalt2 == wh.salt2
	}
}

// recoverJournal deals with a hot journal, the log being at pos.
func (d *DB) recoverJournal(pos ltx.Pos) error {
	hot, err := isHotJournal(d.path(journalFile))
	if err != nil || !hot {
		return err
	}
	t, err := ltx.ReadChecksumTable(d.path(databaseFile))
	if err != nil {
		return err
	}
	if pos.TXID > 0 && t.Checksum() == pos.PostApplyChecksum {
		d.logger.Info("removing the journal of a transaction the log already holds", "pos", pos)
		if err := os.Remove(d.path(journalFile)); err != nil {
			return err
		}
		return durable.SyncDir(d.dir)
	}
	d.logger.Info("rolling back a hot journal", "pos", pos)
	return rollbackJournal(d.path(databaseFile), d.path(journalFile))
}

// isHotJournal reports whether the journal at path holds a transaction to
// roll back: it exists and starts with the journal magic.
func isHotJournal(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, len(journalMagic))
	if _, err := f.ReadAt(b, 0); err != nil {
		return false, nil // shorter than a header: not hot
	}
	return string(b) == string(journalMagic), nil
}

// rollbackJournal has SQLite roll back the hot journal of the database at
// dbPath, under the name SQLite looks for.
func rollbackJournal(dbPath, journalPath string) error {
	sqliteJournal := dbPath + "-journal"
	if err := os.Rename(journalPath, sqliteJournal); err != nil {
		return err
	}
	db, err := sql.Open("sqlite3", "file:"+dbPath+"?mode=rw&_busy_timeout=0")
	if err != nil {
		return err
	}
	_, qerr := db.Exec(`SELECT count(*) FROM sqlite_master`)
	cerr := db.Close()
	if _, err := os.Stat(sqliteJournal); err == nil {
		if err := os.Rename(sqliteJournal, journalPath); err != nil {
			return err
		}
	}
	if qerr != nil {
		return fmt.Errorf("roll back the hot journal with SQLite: %w", qerr)
	}
	return cerr
}

// readWALFile reads the committed transactions of the backing WAL, and
// sets up the WAL state for its generation.
func (d *DB) readWALFile() ([]walTx, error) {
	if d.wal.file == nil {
		return nil, nil
	}
	fi, err := d.wal.file.Stat()
	if err != nil {
		return nil, err
	}
	h, txs, err := readWAL(d.wal.file, fi.Size())
	if err != nil {
		return nil, err
	}
	d.wal.hdr, d.wal.valid = h, h.pageSize != 0
	return txs, nil
}

// loggedWALTxs returns how many of txs, the committed transactions of the
// current WAL, the log holds: those up to the WAL segment of its last file,
// last, when that file is from this WAL generation; none otherwise, since
// the log is synced and the WAL checkpointed before a WAL is restarted, and
// the newest file is never compacted. Log.Open then checks the database as
// it stands after them against the log's position.
func (d *DB) loggedWALTxs(txs []walTx, last ltx.Header) int {
	if last.WALOffset == 0 || last.WALSalt1 != d.wal.hdr.salt1 || last.WALSalt2 != d.wal.hdr.salt2 {
		return 0
	}
	end := last.WALOffset + last.WALSize
	n := 0
	for n < len(txs) && d.wal.hdr.frameOffset(txs[n].last+1) <= end {
		n++
	}
	return n
}

// setCommitted makes txs the committed WAL transactions.
func (d *DB) setCommitted(txs []walTx) {
	d.resetWAL()
	for _, tx := range txs {
		for pgno, off := range tx.frames {
			d.wal.committed[pgno] = off
		}
		d.wal.mxFrame = tx.last + 1
	}
}
