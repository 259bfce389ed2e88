package ltx

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/superfly/ltx"
)

// Tx is a committed transaction to record in the log.
type Tx struct {
	// DB reads the database file as the transaction left it.
	DB io.ReaderAt
	// PageSize and Commit are the database page size and its size in pages
	// after the transaction.
	PageSize uint32
	Commit   uint32
	// Pgnos are the pages the transaction wrote, in any order, duplicates
	// allowed. Pages past Commit are ignored. Pages the database grew by are
	// recorded whether listed or not.
	Pgnos []uint32
	// Timestamp is the commit time; the zero value means now.
	Timestamp time.Time

	// WAL locates the transaction's frames in SQLite's WAL, for a
	// transaction committed in WAL mode; zero otherwise. It is stored in
	// the file's header so recovery can tell which WAL transactions the
	// log already holds.
	WAL WALSegment

	// NoSync leaves the file out of fsync: it is whole under its name but
	// may not survive a power failure until Sync. For transactions whose
	// pages are durable elsewhere (a synced SQLite WAL) until Sync is
	// called.
	NoSync bool

	// NoSyncDir fsyncs the file but not the directory after renaming it
	// into place, until Sync. Filesystems that journal metadata in order
	// (ext4, xfs) make the rename durable no later than any later change
	// to the same filesystem: for a rollback-journal transaction, no later
	// than the journal's deletion, SQLite's own commit point, which SQLite
	// does not fsync under synchronous=FULL either.
	NoSyncDir bool

	// SkipUnchanged records nothing, and Commit returns a nil *FileInfo, if
	// the transaction leaves every page and the size as they were: how a
	// rolled-back rollback-journal transaction looks from outside.
	SkipUnchanged bool
}

// WALSegment is where a transaction's frames are in a SQLite WAL: Offset
// and Size in bytes, and the WAL header's salts.
type WALSegment struct {
	Offset, Size int64
	Salt1, Salt2 uint32
}

// errUnchanged stops writing a file for a transaction that changes nothing.
var errUnchanged = errors.New("transaction changes nothing")

// Commit records tx as the next transaction: it builds its LTX file from
// the pages in tx.DB, writes it durably (temporary file, fsync, rename,
// fsync of the directory) and only then advances the position and the
// checksum table. On error the log is unchanged. See Tx for the exceptions
// (NoSync, SkipUnchanged).
//
// The first transaction of a log, and one that changes the page size, is
// recorded with every page of the database.
func (l *Log) Commit(ctx context.Context, tx Tx) (*FileInfo, error) {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if err := l.settle(); err != nil {
		return nil, fmt.Errorf("commit to %s: %w", l.Name, err)
	}
	pos, table, err := l.commitState()
	if err != nil {
		return nil, err
	}

	w, err := l.writeTx(ctx, tx, pos, table)
	if errors.Is(err, errUnchanged) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	if err := w.out.rename(!tx.NoSync && !tx.NoSyncDir); err != nil {
		w.out.remove()
		return nil, fmt.Errorf("commit txid %s to %s: %w", w.file.info.Header.MinTXID, l.Name, err)
	}
	return l.tell(l.committed(tx, w)), nil
}

// tell calls the Committed hook with info, and returns info. Caller holds
// l.wmu, so the hook sees the commits in order.
func (l *Log) tell(info *FileInfo) *FileInfo {
	if l.Committed != nil {
		l.Committed(*info)
	}
	return info
}

// commitState returns the position and checksum table a transaction
// commits on. Caller holds l.wmu.
func (l *Log) commitState() (Pos, *ChecksumTable, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if err := l.checkOpen(); err != nil {
		if l.closed {
			l.closeSegment()
		}
		return Pos{}, nil, err
	}
	if l.table == nil {
		return Pos{}, nil, fmt.Errorf("log %s has no database to commit from", l.Dir)
	}
	return l.pos(), l.table, nil
}

// committed makes w, renamed into place, part of the log. Caller holds
// l.wmu.
func (l *Log) committed(tx Tx, w *written) *FileInfo {
	if tx.NoSync {
		l.unsynced = append(l.unsynced, w.file)
	}
	if (tx.NoSync || tx.NoSyncDir) && w.file.seg == nil {
		l.dirUnsynced = true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.install(w)
}

// Prepared is a transaction whose LTX file is written and fsynced but not
// yet in the log: the first half of Commit, for a caller that can write the
// file while it waits for something else (SQLite's fsync of the database
// file) and knows only later whether the transaction commits.
type Prepared struct {
	l   *Log
	tx  Tx
	pos Pos
	w   *written
}

// Prepare writes the LTX file of tx as Commit would, always fsynced, and
// returns it unrenamed, or nil if tx.SkipUnchanged finds nothing changed.
// The caller must Commit or Abort it. The log is not held meanwhile;
// Commit fails if another transaction was committed since.
func (l *Log) Prepare(ctx context.Context, tx Tx) (*Prepared, error) {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	pos, table, err := l.commitState()
	if err != nil {
		return nil, err
	}
	tx.NoSync = false
	w, err := l.writeTx(ctx, tx, pos, table)
	if errors.Is(err, errUnchanged) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	return &Prepared{l: l, tx: tx, pos: pos, w: w}, nil
}

// Info describes the prepared file.
func (p *Prepared) Info() FileInfo { return p.w.file.info }

// Commit puts the prepared file in the log, as the next transaction.
func (p *Prepared) Commit() (*FileInfo, error) {
	l := p.l
	l.wmu.Lock()
	defer l.wmu.Unlock()
	pos, _, err := l.commitState()
	if err == nil && pos != p.pos {
		err = fmt.Errorf("commit to %s: prepared at %s, the log is at %s", l.Name, p.pos, pos)
	}
	if err == nil {
		err = p.w.out.rename(!p.tx.NoSyncDir)
	}
	if err != nil {
		p.w.out.remove()
		return nil, err
	}
	return l.tell(l.committed(p.tx, p.w)), nil
}

// Abort discards the prepared file.
func (p *Prepared) Abort() { p.w.out.remove() }

// Sync makes every file committed with NoSync durable: it fsyncs each, then
// the directory. Commits wait meanwhile.
func (l *Log) Sync(ctx context.Context) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if err := l.settle(); err != nil {
		return fmt.Errorf("sync log of %s: %w", l.Name, err)
	}
	if l.seg != nil && l.seg.unsynced {
		if err := l.seg.sync(); err != nil {
			return fmt.Errorf("sync log of %s: %w", l.Name, err)
		}
	}
	alone := 0
	for _, f := range l.unsynced {
		if f.seg == nil {
			alone++
		}
	}
	if alone == 0 && !l.dirUnsynced {
		l.unsynced = l.unsynced[:0]
		return nil
	}
	if alone > syncfsFiles {
		// One syncfs(2) commits every file and the directory in one
		// journal commit, where an fsync each would take one apiece.
		if err := syncFS(l.Dir); err != nil {
			return fmt.Errorf("sync log of %s: %w", l.Name, err)
		}
		l.unsynced, l.dirUnsynced = l.unsynced[:0], false
		return nil
	}
	for _, f := range l.unsynced {
		if err := ctx.Err(); err != nil {
			return err
		}
		if f.seg != nil {
			continue // synced with its segment above
		}
		if err := syncFile(l.path(f.info.Name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			// A file compacted away since is durable in the compacted file.
			return fmt.Errorf("sync log of %s: %w", l.Name, err)
		}
	}
	if err := syncDirectory(l.Dir); err != nil {
		return fmt.Errorf("sync log of %s: %w", l.Name, err)
	}
	l.unsynced, l.dirUnsynced = l.unsynced[:0], false
	return nil
}

// Unsynced returns where the files committed without a sync since the
// last Sync are stored: those a power failure may empty or tear.
func (l *Log) Unsynced() []Stored {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	a := make([]Stored, len(l.unsynced))
	for i, f := range l.unsynced {
		a[i] = l.stored(f)
	}
	return a
}

// Stored is where a file of the log is stored: alone at Path, or Size
// bytes at Offset of the segment at Path.
type Stored struct {
	Name    string
	Path    string
	Segment bool
	Offset  int64
	Size    int64
}

func (l *Log) stored(f *logFile) Stored {
	if f.seg != nil {
		return Stored{Name: f.info.Name, Path: l.path(f.seg.name), Segment: true, Offset: f.off, Size: f.info.Size}
	}
	return Stored{Name: f.info.Name, Path: l.path(f.info.Name), Size: f.info.Size}
}

// syncfsFiles is how many unsynced files make Sync flush the whole
// filesystem instead of fsyncing each.
const syncfsFiles = 16

// pending is an LTX file written, not yet in the log: rename puts it
// there (a temporary file renamed to its name, or a segment append
// committed by its index record), remove discards it.
type pending interface {
	rename(syncDir bool) error
	remove()
}

func (a *segmentAppend) rename(syncIndex bool) error { return a.commit(syncIndex) }
func (a *segmentAppend) remove()                     {} // the next append writes over its bytes

// written is an LTX file on disk that is not yet part of the log.
type written struct {
	out     pending // the file, not yet in the log
	file    *logFile
	table   *ChecksumTable // table to apply changes to (a new one on a full rewrite)
	changes []pageSum
	bytes   []byte // the file's bytes, if small enough to keep (see keepRecent)
}

// writeTx builds and writes the LTX file of tx as the transaction after pos,
// on a database whose page checksums are table. Caller holds l.wmu, so
// neither can change under it.
func (l *Log) writeTx(ctx context.Context, tx Tx, pos Pos, table *ChecksumTable) (*written, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if !ltx.IsValidPageSize(tx.PageSize) {
		return nil, fmt.Errorf("commit to %s: invalid page size %d", l.Name, tx.PageSize)
	}
	txid := pos.TXID + 1
	w := &written{table: table}
	full := txid == 1 || tx.PageSize != table.PageSize()
	if full {
		w.table = NewChecksumTable(tx.PageSize)
	}
	pgnos, err := txPages(tx, w.table.Pages())
	if err != nil {
		return nil, fmt.Errorf("commit to %s: %w", l.Name, err)
	}
	ts := tx.Timestamp
	if ts.IsZero() {
		ts = time.Now()
	}
	hdr := ltx.Header{
		Version:          ltx.Version,
		PageSize:         tx.PageSize,
		Commit:           tx.Commit,
		MinTXID:          txid,
		MaxTXID:          txid,
		Timestamp:        ts.UnixMilli(),
		PreApplyChecksum: pos.PostApplyChecksum,
		WALOffset:        tx.WAL.Offset,
		WALSize:          tx.WAL.Size,
		WALSalt1:         tx.WAL.Salt1,
		WALSalt2:         tx.WAL.Salt2,
		NodeID:           l.NodeID,
	}
	var trailer ltx.Trailer
	name := FormatName(txid, txid)
	encode := func(out io.Writer) error {
		enc := getEncoder(out)
		defer putEncoder(enc)
		if err := enc.EncodeHeader(hdr); err != nil {
			return err
		}
		buf := make([]byte, tx.PageSize)
		hash := ltx.NewHasher()
		w.changes = make([]pageSum, 0, len(pgnos))
		for _, pgno := range pgnos {
			if _, err := tx.DB.ReadAt(buf, int64(pgno-1)*int64(tx.PageSize)); err != nil {
				if errors.Is(err, io.EOF) {
					err = fmt.Errorf("database file ends before page %d of %d", pgno, tx.Commit)
				}
				return fmt.Errorf("read page %d: %w", pgno, err)
			}
			w.changes = append(w.changes, pageSum{pgno, ltx.ChecksumPageWithHasher(hash, pgno, buf)})
			if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, buf); err != nil {
				return err
			}
		}
		post := w.table.next(w.changes, tx.Commit)
		if tx.SkipUnchanged && !full && post == pos.PostApplyChecksum && tx.Commit == table.Pages() {
			return errUnchanged
		}
		enc.SetPostApplyChecksum(post)
		if err := enc.Close(); err != nil {
			return err
		}
		trailer = enc.Trailer()
		return nil
	}
	w.file = &logFile{info: FileInfo{Name: name, Header: hdr}}
	if l.SegmentSize > 0 {
		// The bytes are kept too, for cursors at the log's end, unless
		// the file is too large to keep.
		var kept keptBytes
		tee := func(out io.Writer) error { return encode(io.MultiWriter(out, &kept)) }
		var a *segmentAppend
		if a, err = l.writeSegment(txid, tx.WAL, !tx.NoSync, tee); err == nil {
			if !kept.over {
				w.bytes = kept.Bytes()
			}
			w.out, w.file.seg, w.file.off = a, a.s, a.off
			w.file.info.Size, w.file.info.Seal = a.size, a.seal
		}
	} else {
		var t *tempFile
		if t, err = writeTemp(l.Dir, name, !tx.NoSync, l.Spares, encode); err == nil {
			w.out = t
			w.file.info.Size, w.file.info.Seal = t.size, t.seal
		}
	}
	if errors.Is(err, errUnchanged) {
		return nil, err
	} else if err != nil {
		return nil, fmt.Errorf("commit txid %s to %s: %w", txid, l.Name, err)
	}
	w.file.info.PostApplyChecksum, w.file.info.FileChecksum = trailer.PostApplyChecksum, trailer.FileChecksum
	return w, nil
}

// Recent files: a replica's stream reads each file the primary commits
// moments after the commit. Serving it from the bytes the encoder wrote
// spares opening the segment, reading the file back and decoding it to
// verify it, for every replica.
const maxRecentFile = 256 << 10 // the largest file whose bytes are kept

// maxRecentBytes bounds the bytes kept for a log.
var maxRecentBytes = 4 << 20

// keptBytes keeps what is written to it, up to maxRecentFile bytes; past
// that it drops them all and keeps nothing more.
type keptBytes struct {
	bytes.Buffer
	over bool
}

func (k *keptBytes) Write(p []byte) (int, error) {
	if !k.over && k.Len()+len(p) > maxRecentFile {
		k.over = true
		k.Buffer = bytes.Buffer{}
	}
	if k.over {
		return len(p), nil
	}
	return k.Buffer.Write(p)
}

// keepRecent keeps b, the bytes of f, just installed, dropping those of
// the oldest files kept past maxRecentBytes. Caller holds l.mu.
func (l *Log) keepRecent(f *logFile, b []byte) {
	f.recent = b
	l.recents = append(l.recents, f)
	l.recentBytes += len(b)
	for l.recentBytes > maxRecentBytes && len(l.recents) > 1 {
		old := l.recents[0]
		l.recentBytes -= len(old.recent)
		old.recent = nil
		l.recents[0] = nil
		l.recents = l.recents[1:] // append moves the rest when it grows
	}
}

// install makes a written file part of the log. Caller holds l.wmu and l.mu.
func (l *Log) install(w *written) *FileInfo {
	w.table.apply(w.changes, w.file.info.Header.Commit)
	l.table = w.table
	if w.file.seg != nil {
		w.file.seg.live.Add(1)
	}
	l.files = append(l.files, w.file)
	if w.bytes != nil && int64(len(w.bytes)) == w.file.info.Size {
		l.keepRecent(w.file, w.bytes)
	}
	l.notify()
	info := w.file.info
	return &info
}

// txPages returns the pages to record for tx, ascending and without the
// lock page: every page if the table is empty (a full rewrite), else the
// pages it wrote up to Commit plus any the database grew by.
func txPages(tx Tx, have uint32) ([]uint32, error) {
	lockPgno := ltx.LockPgno(tx.PageSize)
	pgnos := make([]uint32, 0, len(tx.Pgnos)+int(max(tx.Commit, have)-have))
	for _, pgno := range tx.Pgnos {
		if pgno == 0 {
			return nil, fmt.Errorf("page number 0 in transaction")
		}
		if pgno <= tx.Commit && pgno != lockPgno {
			pgnos = append(pgnos, pgno)
		}
	}
	for pgno := have + 1; pgno <= tx.Commit; pgno++ {
		if pgno != lockPgno {
			pgnos = append(pgnos, pgno)
		}
	}
	slices.Sort(pgnos)
	return slices.Compact(pgnos), nil
}
