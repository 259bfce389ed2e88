package ltx

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/internal/durable"
)

// Apply adds the LTX file at path, received whole from another node's log,
// to this log as its next file, and applies it to the log's database file
// (DBPath). The file goes into the log first (copied, sealed, fsynced,
// renamed, directory fsynced), then its pages into the database file,
// which is fsynced: a crash in between leaves the log one file ahead of
// the database, and Open finishes applying it.
//
// The file must apply at the log's position, or be a snapshot. A snapshot
// replaces every file in the log: they are moved to lostDir if it is not
// "" (the history a diverged replica is about to lose), else removed.
//
// It returns the file as the log holds it and the pages it wrote,
// ascending. If the file does not apply, nothing changes. If writing the
// database fails, the file stays in the log directory and the database may
// be partly written; the log's position does not move, and applying the
// same file again repairs it.
func (l *Log) Apply(ctx context.Context, path, lostDir string) (*FileInfo, []uint32, error) {
	infos, pgnos, err := l.ApplyFiles(ctx, []string{path}, ApplyOptions{LostDir: lostDir})
	if err != nil {
		return nil, nil, err
	}
	return &infos[0], pgnos, nil
}

// PartlyAppliedError is the error of an apply that failed once it had
// begun to write the database file (a full disk, a cancelled context): the
// file may hold part of the group's transactions, up to MaxTXID, while the
// log's position has not moved. Applying files up to MaxTXID again
// repairs it, as Open does after a crash; until then readers must be kept
// out.
type PartlyAppliedError struct {
	Err     error
	MaxTXID TXID
}

func (e *PartlyAppliedError) Error() string {
	return fmt.Sprintf("%v (the database file may hold part of the transactions up to %s until they are applied again)", e.Err, e.MaxTXID)
}

func (e *PartlyAppliedError) Unwrap() error { return e.Err }

// ApplyFiles is Apply for files that follow one another, applied as one
// group commit: they go into the log together (fsynced together, one
// directory fsync), then their pages into the database in order, which is
// fsynced once. A replica that has fallen behind catches up at the cost of
// a few fsyncs per group instead of four per file. Only the first file may
// be a snapshot.
//
// It returns the files as the log holds them and the pages written,
// ascending, each once. If a file does not apply, nothing changes; after a
// crash, Open finishes applying the group, as it does a single file.
func (l *Log) ApplyFiles(ctx context.Context, paths []string, opts ApplyOptions) ([]FileInfo, []uint32, error) {
	if len(paths) == 0 {
		return nil, nil, nil
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	pos, table, err := l.commitState()
	if err != nil {
		return nil, nil, err
	}
	infos := make([]FileInfo, len(paths))
	at := pos
	if len(opts.Verified) != 0 && len(opts.Verified) != len(paths) {
		return nil, nil, fmt.Errorf("apply to %s: %d files described as verified for %d files", l.Name, len(opts.Verified), len(paths))
	}
	if opts.Data != nil && len(opts.Data) != len(paths) {
		return nil, nil, fmt.Errorf("apply to %s: the bytes of %d files for %d files", l.Name, len(opts.Data), len(paths))
	}
	// Bytes the caller holds and verified are not verified again; nor are
	// files it verified and hands over (Move). Copied files are verified as
	// they are copied.
	verified := (opts.Move || opts.Data != nil) && len(opts.Verified) != 0
	for i, path := range paths {
		info := &FileInfo{}
		if verified {
			*info = opts.Verified[i]
		} else if data := opts.data(i); data != nil {
			if info, err = readFileInfo(bytes.NewReader(data), "received file", int64(len(data))); err != nil {
				return nil, nil, fmt.Errorf("apply to %s: %w", l.Name, err)
			}
		} else if info, err = ReadFileInfo(path); err != nil {
			return nil, nil, fmt.Errorf("apply %s to %s: %w", path, l.Name, err)
		}
		hdr := info.Header
		switch {
		case hdr.IsSnapshot() && i > 0:
			return nil, nil, fmt.Errorf("apply txid %s-%s to %s: a snapshot must be the first file of a group", hdr.MinTXID, hdr.MaxTXID, l.Name)
		case !hdr.IsSnapshot() && info.PreApplyPos() != at:
			return nil, nil, fmt.Errorf("apply txid %s-%s to %s: it applies at %s, the log is at %s", hdr.MinTXID, hdr.MaxTXID, l.Name, info.PreApplyPos(), at)
		}
		info.Name = FormatName(hdr.MinTXID, hdr.MaxTXID)
		infos[i] = *info
		at = info.Pos()
	}
	snapshot := infos[0].Header.IsSnapshot()
	segmented := !snapshot && l.SegmentSize > 0 && !slices.ContainsFunc(infos, func(i FileInfo) bool { return i.Header.MinTXID != i.Header.MaxTXID })
	if !segmented || !opts.Overlap || opts.Target == nil {
		if err := l.settle(); err != nil {
			return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
		}
	}
	if u := l.unapplied; u != nil {
		// Its records stayed for Open while the database might hold part
		// of it; the files applied now take their place.
		if err := u.seg.truncate(u.n, u.end); err != nil {
			return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
		}
		l.unapplied = nil
	}
	if segmented {
		return l.applySegment(ctx, paths, infos, table, pos, opts, verified)
	}
	// Copied or moved in, verified (unless the caller did), before
	// anything in the log changes; the marker names the group's first file, whose pages go
	// into the database first, for Open to finish the job after a crash.
	temps, err := l.copyInAll(ctx, paths, opts.Data, infos, opts.Move, verified)
	if err != nil {
		return nil, nil, err
	}
	if snapshot {
		// The snapshot replaces the log's files, which Prune and Compact
		// must neither remove by name nor replace meanwhile (a new file
		// may have the name of an old one): they are held off until the
		// list holds the new files. They hold l.maint only to remove files
		// or to put a compacted file in place, never while they compact
		// (see compactRun), so the apply waits for one such step at most.
		l.maint.Lock()
		defer l.maint.Unlock()
		if err := l.setAside(opts.LostDir); err != nil {
			removeTemps(temps)
			return nil, nil, err
		}
	}
	if err := l.installTemps(temps, infos[0].Name); err != nil {
		return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
	}
	if snapshot {
		table = NewChecksumTable(infos[0].Header.PageSize)
		pos = Pos{}
	} else {
		table = l.scratchTable(table)
	}
	files := make([]*logFile, len(infos))
	for i, info := range infos {
		files[i] = &logFile{info: info}
	}
	return l.applied(ctx, files, table, pos, snapshot, opts.Target)
}

// scratchTable returns a table equal to table, the log's, for an apply to
// change while the log's stays as it is for its readers: the spare that
// the last apply left (the table it replaced, brought up to date) if it
// still mirrors table, else a copy. A copy costs a checksum for every page
// of the database, per group applied; the spare, the pages the group
// changes, twice. The changes made to it are journaled for keepSpare.
// Caller holds l.wmu.
func (l *Log) scratchTable(table *ChecksumTable) *ChecksumTable {
	s := l.spare
	if s == nil || copyTable || l.spareOf != table || l.spareGen != table.gen {
		s = table.Clone()
	}
	l.spare, l.spareOf = nil, nil
	s.journal = new([]tableChange)
	return s
}

// copyTable makes scratchTable copy the table always (benchmarks).
var copyTable = false

// keepSpare makes old, the table that an apply's table cur replaced, the
// spare for the next apply: it makes the changes journaled in cur to old.
// Caller holds l.wmu.
func (l *Log) keepSpare(old, cur *ChecksumTable) {
	journal := cur.journal
	cur.journal = nil
	if old == nil || journal == nil || old.pageSize != cur.pageSize {
		return // replaced whole on the way (a new page size): no journal of it
	}
	for _, c := range *journal {
		old.apply(c.changes, c.commit)
	}
	if old.xor != cur.xor || len(old.sums) != len(cur.sums) {
		return // not a mirror after all: the next apply copies
	}
	l.spare, l.spareOf, l.spareGen = old, cur, cur.gen
}

// applied applies files, in the log directory, to the database and puts
// them in the log. Caller holds l.wmu.
func (l *Log) applied(ctx context.Context, files []*logFile, table *ChecksumTable, pos Pos, snapshot bool, target ApplyTarget) ([]FileInfo, []uint32, error) {
	pgnos, err := l.applyToDatabase(ctx, files, table, pos, true, target)
	if err != nil {
		return nil, nil, &PartlyAppliedError{Err: err, MaxTXID: files[len(files)-1].info.Header.MaxTXID}
	}
	if files[0].seg == nil {
		// Emptied, not removed: removing and creating a file per group
		// costs more than writing it on some filesystems. Neither need be
		// durable: a marker naming a file the database already matches is
		// ignored. (A group in a segment leaves it naming its first file:
		// see applySegment.)
		_ = os.Truncate(l.path(applyingName), 0)
		l.marked, l.markWritten = 0, 0
	}
	l.mu.Lock()
	if snapshot {
		l.files = l.files[:0]
	}
	old := l.table
	l.table = table
	infos := make([]FileInfo, len(files))
	for i, f := range files {
		if f.seg != nil {
			f.seg.live.Add(1)
		}
		l.files = append(l.files, f)
		infos[i] = f.info
	}
	l.notify()
	l.mu.Unlock()
	if old != table {
		l.keepSpare(old, table)
	}
	return infos, pgnos, nil
}

// applySegment is ApplyFiles for a group of files of one transaction each
// that follow the log's position: it appends them to the log's segment,
// and applies them from there. The files and their records are fsynced
// together, once, before the database is written. Open finishes a group a
// crash interrupted after that, and cuts off one interrupted before, whose
// records may be on disk without its bytes: it knows which by the marker,
// which names the first file of the group, or of an earlier one (Open
// cuts records only from there on, and applies the files again from
// there, which leaves the database where applying them once does). So the
// marker must be durable, naming this group or an earlier one, before any
// of the group's records is: the first time it is fsynced on its own,
// before the group is written; after that, the group's name is fsynced
// with the group, while the marker on disk names this group or the one
// before. Caller holds l.wmu.
func (l *Log) applySegment(ctx context.Context, paths []string, infos []FileInfo, table *ChecksumTable, pos Pos, opts ApplyOptions, verified bool) ([]FileInfo, []uint32, error) {
	first := infos[0].Header.MinTXID
	overlap := opts.Overlap && opts.Target != nil
	ahead := l.marked == 0 || l.marked > first
	if ahead || !overlap {
		if err := l.settle(); err != nil {
			return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
		}
	}
	// While the records of a group before are being fsynced, the marker
	// keeps naming it: its name must not reach the disk before them (see
	// settle).
	if l.group.Load() == nil {
		if err := l.mark(infos[0].Name, ahead); err != nil {
			return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
		}
		l.markWritten = first
		if ahead {
			l.marked = first
		}
	}
	s, err := l.appending(first, true)
	if err != nil {
		return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
	}
	n0, end0 := s.n, s.end
	fail := func(err error) ([]FileInfo, []uint32, error) {
		if terr := s.truncate(n0, end0); terr != nil {
			err = errors.Join(err, terr)
		}
		return nil, nil, fmt.Errorf("apply %s to %s: %w", infos[0].Name, l.Name, err)
	}
	files := make([]*logFile, len(infos))
	for i, path := range paths {
		info := &infos[i]
		data := opts.data(i)
		if data != nil {
			path = "received file " + info.Name
		}
		a, err := l.appendTo(s, info.Header.MinTXID, WALSegment{Offset: info.Header.WALOffset, Size: info.Header.WALSize, Salt1: info.Header.WALSalt1, Salt2: info.Header.WALSalt2},
			false, func(w io.Writer) error {
				if data != nil {
					return copyVerified(ctx, w, bytes.NewReader(data), !verified)
				}
				return copyFile(ctx, w, path, !verified)
			})
		if err != nil {
			return fail(err)
		}
		switch {
		case a.size != info.Size:
			return fail(fmt.Errorf("copied %d bytes of %s, want %d", a.size, info.Name, info.Size))
		case verified && a.seal != info.Seal:
			return fail(fmt.Errorf("%w: %s changed since it was verified", ErrCorrupt, path))
		}
		info.Seal = a.seal
		if err := a.commit(false); err != nil {
			return fail(err)
		}
		files[i] = &logFile{info: *info, seg: s, off: a.off, mem: data}
	}
	defer func() {
		for _, f := range files {
			f.mem = nil
		}
	}()
	var marker *os.File
	if !ahead {
		marker = l.marker
	}
	if !overlap {
		if err := s.syncBoth(marker); err != nil {
			return fail(err)
		}
		l.marked = first
		failpoint("syncdir")
		return l.applySynced(ctx, files, table, pos, opts.Target, s, n0, end0)
	}
	// The records' fsync runs while the Target takes the pages, and goes
	// on after ApplyFiles returns: readers see the group an fsync sooner,
	// and the next group may be applied meanwhile. Its fsync follows this
	// one. AwaitLogged waits for them; everything else that needs the
	// log durable settles first.
	prev := l.group.Load()
	g := &groupSync{done: make(chan struct{}), seg: s, marked: l.markWritten}
	l.group.Store(g)
	go func() {
		defer close(g.done)
		if prev != nil {
			<-prev.done
			if g.err = prev.err; g.err != nil {
				return
			}
		}
		failpoint("group-sync")
		g.err = s.syncFiles(marker)
	}()
	infos, pgnos, err := l.applySynced(ctx, files, table, pos, opts.Target, s, n0, end0)
	if err != nil {
		return nil, nil, errors.Join(err, l.settle())
	}
	return infos, pgnos, nil
}

// applySynced applies a group whose records s holds, n0 records and end0
// bytes before it, through target. Caller holds l.wmu.
func (l *Log) applySynced(ctx context.Context, files []*logFile, table *ChecksumTable, pos Pos, target ApplyTarget, s *segment, n0 int, end0 int64) ([]FileInfo, []uint32, error) {
	infos, pgnos, err := l.applied(ctx, files, l.scratchTable(table), pos, false, target)
	if err != nil {
		// The database may hold part of the group: its records stay, for
		// Open to finish it after a crash, until the next apply.
		l.unapplied = &unappliedGroup{seg: s, n: n0, end: end0}
	}
	return infos, pgnos, err
}

// groupSync is the fsync of a group's records in flight, applied with
// ApplyOptions.Overlap; it follows that of the group before, if any, and
// fails if that failed.
type groupSync struct {
	done   chan struct{}
	err    error
	seg    *segment
	marked TXID // the group the marker named when the fsync began
}

// settle waits for the fsync of the groups applied with Overlap, if any
// is still in flight, and returns its error. The segment is then synced
// up to its last record: every other append settles first. Caller holds
// l.wmu.
func (l *Log) settle() error {
	g := l.group.Load()
	if g == nil {
		return nil
	}
	<-g.done
	l.group.Store(nil)
	if g.err != nil {
		// The groups are applied, in the database and the log in memory;
		// the disk may hold neither. The segment stays unsynced, for the
		// next fsync to try again, and a start after a crash cuts the
		// database back to the log if it must.
		return fmt.Errorf("the records of groups applied before are not durable: %w", g.err)
	}
	g.seg.unsynced = false
	l.marked = g.marked
	return nil
}

// AwaitLogged waits until the records of every group applied with
// ApplyOptions.Overlap so far are durable in the log, or ctx ends, and
// returns the fsync's error. A replica acknowledges a group once they
// are; and an ApplyTarget that writes pages where a power cut could leave
// them ahead of the log, with no way for its owner to cut them back,
// calls it from its Sync first.
func (l *Log) AwaitLogged(ctx context.Context) error {
	g := l.group.Load()
	if g == nil {
		return nil
	}
	select {
	case <-g.done:
		return g.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// unappliedGroup is where the segment ended before a group whose apply
// failed.
type unappliedGroup struct {
	seg *segment
	n   int
	end int64
}

// EndApplying makes a log that was given files (ApplyFiles, Apply) one
// that commits its own, as when a replica becomes the primary: it empties
// the apply marker durably, which would otherwise name the last group
// applied, and Open would take what is committed after it for an
// unfinished group. The database must match the log: a group whose apply
// failed and was not applied again is an error, and nothing changes.
func (l *Log) EndApplying() error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if err := l.settle(); err != nil {
		return err
	}
	if l.unapplied != nil {
		return fmt.Errorf("log %s: a group of files failed to apply to the database and was not applied again; "+
			"the database does not match the log and cannot take commits", l.Dir)
	}
	if l.marker == nil && l.marked == 0 {
		if fi, err := os.Stat(l.path(applyingName)); err != nil || fi.Size() == 0 {
			return nil // not applying
		}
	}
	if l.marker != nil {
		_ = l.marker.Close()
		l.marker = nil
	}
	l.marked, l.markWritten = 0, 0
	if err := durable.WriteFile(l.path(applyingName), nil); err != nil {
		return fmt.Errorf("log %s: empty the apply marker: %w", l.Dir, err)
	}
	return nil
}

// mark writes name into the apply marker, fsynced if sync. Caller holds
// l.wmu.
func (l *Log) mark(name string, sync bool) error {
	if l.marker == nil {
		f, err := os.OpenFile(l.path(applyingName), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		l.marker = f
	}
	f := l.marker
	if _, err := f.WriteAt([]byte(name), 0); err != nil {
		return diskError("write", f.Name(), err)
	}
	if err := f.Truncate(int64(len(name))); err != nil {
		return diskError("truncate", f.Name(), err)
	}
	if sync {
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return diskError("sync", f.Name(), err)
		}
	}
	return nil
}

// copyFile copies the file at path to w, verifying it as it reads it if
// verify.
func copyFile(ctx context.Context, w io.Writer, path string, verify bool) error {
	src, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = src.Close() }()
	return copyVerified(ctx, w, src, verify)
}

// copyVerified copies src to w, verifying it as it reads it if verify.
// Bytes in memory (a *bytes.Reader) that need no verifying are written
// at once.
func copyVerified(ctx context.Context, w io.Writer, src io.Reader, verify bool) error {
	if br, ok := src.(*bytes.Reader); ok && !verify {
		if err := ctx.Err(); err != nil {
			return err
		}
		_, err := br.WriteTo(w)
		return err
	}
	if verify {
		src = NewVerifyReader(src, 0)
	}
	buf := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(buf)
	_, err := io.CopyBuffer(w, &ctxReader{ctx: ctx, r: src}, *buf)
	return err
}

// copyBuffers are copyVerified's buffers, kept rather than made per file.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// ApplyOptions are how ApplyFiles treats the files it applies.
type ApplyOptions struct {
	// LostDir, if not "", is where the log's files go when a snapshot
	// replaces them, in a directory named by the time; else they are
	// removed.
	LostDir string
	// Move moves the files into the log instead of copying them, when they
	// are on the log's filesystem: a receiving node saves writing each
	// file twice, and creating a file, which costs more than writing a
	// small one on some filesystems. A file that did not go into the log
	// is left where it was, or removed.
	Move bool
	// Verified, if set with Move, describes each file as the caller read
	// and verified it moments before: header, trailer, size, and Seal the
	// seal of its bytes (see VerifyReader.Seal). The files are then not
	// read again before they are installed; applying them still checks
	// their file checksums and the database checksum they leave.
	Verified []FileInfo
	// Data, if set, holds the bytes of the files in memory, Data[i] those
	// of paths[i] where it is not nil: they are written into the log from
	// there, and paths[i] is not read (it may be ""). With Verified, the
	// caller verified them, as for Move.
	Data [][]byte
	// Target, if set, receives the group's pages in place of the database
	// file: its Sync is called once every file of the group has been
	// written through it and checked, and the group is applied when Sync
	// returns nil. A crash before that leaves the group to Open, which
	// finishes it in the database file.
	Target ApplyTarget
	// Overlap, with a Target and a group of one transaction per file,
	// gives the Target the group's pages while the fsync of the group's
	// records in the log is in flight, rather than after it, and returns
	// without waiting for that fsync: readers of the Target see the group
	// an fsync sooner, and the next group may be applied meanwhile (its
	// fsync follows). AwaitLogged waits for them: the caller must not
	// acknowledge a group before it returns nil. A power cut may leave
	// the Target's pages durable and the records not: the database ahead
	// of its log. The Target's owner must cut the database back to a
	// state of the log before Open (fs does, for the WAL a replica
	// writes), and a Target that writes pages it could not cut back waits
	// for the log first (AwaitLogged). Everything else that needs the
	// log durable (Commit, Sync, EndApplying, a segment's roll, Close, an
	// apply without Overlap) waits for it too.
	Overlap bool
}

// data returns the bytes of the i'th file, if the caller holds them.
func (o *ApplyOptions) data(i int) []byte {
	if o.Data == nil {
		return nil
	}
	return o.Data[i]
}

// ApplyTarget is what ApplyFiles writes a group's pages through in place of
// the database file (see ApplyOptions.Target).
type ApplyTarget interface {
	DatabaseFile
	// Sync makes the group's pages durable. If logged, it need not do so
	// at once: the group is durable in the log's segment, and the next
	// Open applies again what a crash lost of it and of the groups before
	// it (see rollForward), provided the crash leaves the database at the
	// end of one of the log's files, as a WAL's checksums do. The target
	// must then make the pages durable before the log compacts or prunes
	// the group's files.
	Sync(logged bool) error
}

// fileTarget is the database file as an ApplyTarget: fsynced always.
type fileTarget struct{ *os.File }

func (f fileTarget) Sync(bool) error { return f.File.Sync() }

// setAside takes every file out of the log directory ahead of a snapshot:
// into lostDir/<time>/ if lostDir is set, else removed. Caller holds l.wmu
// and l.maint.
func (l *Log) setAside(lostDir string) error {
	l.mu.RLock()
	files := append([]*logFile(nil), l.files...)
	l.mu.RUnlock()
	if len(files) == 0 {
		return nil
	}
	var dst string
	if lostDir != "" {
		dst = filepath.Join(lostDir, time.Now().UTC().Format("20060102T150405.000000000Z"))
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("keep the lost transactions of %s: %w", l.Name, err)
		}
	}
	for _, f := range files {
		var err error
		switch {
		case dst != "" && f.seg != nil:
			// Cut out of its segment, which goes with its last file.
			if err = copyRange(l.path(f.seg.name), f.off, f.info.Size, filepath.Join(dst, f.info.Name)); err == nil {
				err = l.removeFile(f)
			}
		case dst != "":
			err = os.Rename(l.path(f.info.Name), filepath.Join(dst, f.info.Name))
		default:
			err = l.removeFile(f)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("replace the log of %s with a snapshot: %w", l.Name, err)
		}
		_ = os.Remove(l.path(posName(f.info.Name)))
	}
	// The next commit starts a segment of its own.
	if err := l.rollSegment(); err != nil {
		return fmt.Errorf("replace the log of %s with a snapshot: %w", l.Name, err)
	}
	if dst != "" {
		if err := syncDirectory(dst); err != nil {
			return err
		}
		l.Logger.Warn("kept the transactions a snapshot replaces", "db", l.Name, "dir", dst, "files", len(files),
			"from", files[0].info.PreApplyPos(), "to", files[len(files)-1].info.Pos())
	}
	return syncDirectory(l.Dir)
}

// copyInAll copies, or moves, the files at paths into the log directory
// under temporary names, sealed, verifying each as it reads it unless the
// caller verified it (infos then hold its seal), and records their seals
// in infos. A single file is fsynced here; a group is made durable by
// installTemps. Caller holds l.wmu.
func (l *Log) copyInAll(ctx context.Context, paths []string, data [][]byte, infos []FileInfo, move, verified bool) ([]*tempFile, error) {
	temps := make([]*tempFile, 0, len(paths))
	sync := len(paths) == 1
	for i, path := range paths {
		var t *tempFile
		var err error
		switch {
		case data != nil && data[i] != nil:
			t, err = l.copyIn(ctx, bytes.NewReader(data[i]), &infos[i], sync)
		case move:
			t, err = l.moveIn(ctx, path, &infos[i], verified, sync)
			if errors.Is(err, unix.EXDEV) {
				t, err = l.copyPath(ctx, path, &infos[i], sync)
			}
		default:
			t, err = l.copyPath(ctx, path, &infos[i], sync)
		}
		if err != nil {
			removeTemps(temps)
			return nil, err
		}
		temps = append(temps, t)
	}
	return temps, nil
}

// copyPath is copyIn from the file at path.
func (l *Log) copyPath(ctx context.Context, path string, info *FileInfo, sync bool) (*tempFile, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = src.Close() }()
	return l.copyIn(ctx, src, info, sync)
}

// copyIn copies the file src reads into the log directory under a
// temporary name, sealed and fsynced if sync, verifying it as it reads
// it, and records its seal in info. Caller holds l.wmu and renames or
// removes it.
func (l *Log) copyIn(ctx context.Context, src io.Reader, info *FileInfo, sync bool) (*tempFile, error) {
	t, err := writeTemp(l.Dir, info.Name, sync, l.Spares, func(w io.Writer) error {
		return copyVerified(ctx, w, src, true)
	})
	if err != nil {
		return nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
	}
	if t.size != info.Size {
		t.remove()
		return nil, fmt.Errorf("apply %s to %s: copied %d bytes of %d", info.Name, l.Name, t.size, info.Size)
	}
	info.Seal = t.seal
	return t, nil
}

// moveIn is copyIn that moves the file into the log directory instead:
// renamed to a temporary name there (an error wrapping unix.EXDEV if it
// is on another filesystem, and then left where it is), then verified as
// it is read unless the caller verified it (info.Seal is then the seal of
// its bytes), sealed, and fsynced if sync.
func (l *Log) moveIn(ctx context.Context, path string, info *FileInfo, verified, sync bool) (t *tempFile, err error) {
	tmp := filepath.Join(l.Dir, "."+info.Name+"."+strconv.FormatUint(rand.Uint64(), 36)+tmpExt)
	if err := unix.Renameat(unix.AT_FDCWD, path, unix.AT_FDCWD, tmp); err != nil {
		return nil, &os.LinkError{Op: "rename", Old: path, New: tmp, Err: err}
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	if !verified {
		h := newSealHash()
		n, err := io.Copy(h, &ctxReader{ctx: ctx, r: NewVerifyReader(f, 0)})
		if err != nil {
			return nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
		}
		if n != info.Size {
			return nil, fmt.Errorf("apply %s to %s: read %d bytes of %d", info.Name, l.Name, n, info.Size)
		}
		info.Seal = sealValue(h)
	}
	if err := writeSeal(f, info.Seal); err != nil {
		return nil, diskError("seal", tmp, err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			return nil, diskError("sync", tmp, err)
		}
	}
	return &tempFile{dir: l.Dir, name: info.Name, tmp: tmp, size: info.Size, seal: info.Seal}, nil
}

// installTemps makes temps, written by copyInAll, part of the log directory
// durably, with the marker naming first: the marker and the files are
// made durable (a single file and the marker with an fsync each; a group
// and the marker with one syncfs(2), where an fsync each would cost one
// flush apiece), then the files are renamed and the directory fsynced, so
// no file is in the log before its bytes and the marker are on disk. On
// an error it removes what it wrote. Caller holds l.wmu.
func (l *Log) installTemps(temps []*tempFile, first string) error {
	undo := func(renamed int) {
		for _, t := range temps[:renamed] {
			_ = os.Remove(filepath.Join(t.dir, t.name))
		}
		removeTemps(temps[renamed:])
		_ = os.Truncate(l.path(applyingName), 0)
	}
	group := len(temps) > 1
	err := writeApplying(l.path(applyingName), first, !group)
	if err == nil && group {
		err = syncFS(l.Dir)
	}
	if err != nil {
		undo(0)
		return err
	}
	for i, t := range temps {
		if err := t.rename(false); err != nil {
			undo(i)
			return err
		}
	}
	if err := syncDirectory(l.Dir); err != nil {
		undo(len(temps))
		return err
	}
	failpoint("syncdir")
	return nil
}

// removeTemps removes files written under temporary names.
func removeTemps(temps []*tempFile) {
	for _, t := range temps {
		t.remove()
	}
}

// applyToDatabase writes the log's files infos, which follow one another
// from pos, into the database file, table holding its page checksums, and
// fsyncs it. It returns the pages written, ascending, each once. Unless
// check, only the last file must leave the database at its post-apply
// checksum: a crash in the middle of a group leaves pages of later files
// in the database, which earlier ones do not account for.
func (l *Log) applyToDatabase(ctx context.Context, files []*logFile, table *ChecksumTable, pos Pos, check bool, target ApplyTarget) ([]uint32, error) {
	db := target
	if db == nil {
		f, err := os.OpenFile(l.DBPath, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("apply %s to %s: %w", files[0].info.Name, l.Name, err)
		}
		defer func() { _ = f.Close() }()
		db = fileTarget{f}
	}
	var pgnos []uint32
	for i, f := range files {
		p, err := l.applyLogFile(ctx, db, f, table, pos, check || i == len(files)-1)
		if err != nil {
			return nil, diskError(fmt.Sprintf("apply %s to", f.info.Name), l.DBPath, err)
		}
		pos = f.info.Pos()
		if i == 0 {
			pgnos = p
		} else {
			pgnos = append(pgnos, p...)
		}
	}
	// A group in a segment is in the log durably, and the marker covering
	// it stays (see applySegment); other files are not (applied empties
	// the marker).
	if err := db.Sync(files[0].seg != nil); err != nil {
		return nil, diskError(fmt.Sprintf("apply %s to", files[len(files)-1].info.Name), l.DBPath, err)
	}
	if len(files) > 1 {
		slices.Sort(pgnos)
		pgnos = slices.Compact(pgnos)
	}
	return pgnos, nil
}

// applyLogFile writes the pages of the log's file info into db. The file
// is decoded once: its structure and file checksum are checked as it is
// (its seal would add a pass over every byte), and its pages by the
// database checksum it must leave, which covers them all.
func (l *Log) applyLogFile(ctx context.Context, db DatabaseFile, f *logFile, table *ChecksumTable, pos Pos, check bool) ([]uint32, error) {
	if !check {
		pos = f.info.PreApplyPos()
	}
	if f.mem != nil {
		_, pgnos, err := applyFile(ctx, db, table, pos, bytes.NewReader(f.mem), check)
		return pgnos, err
	}
	src, err := l.open(f)
	if err != nil {
		return nil, err
	}
	defer func() { _ = src.Close() }()
	_, pgnos, err := applyFile(ctx, db, table, pos, src, check)
	return pgnos, err
}

// ctxReader stops a copy when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// applyingName is the marker Apply leaves in the log directory while it
// writes a file's pages into the database.
const applyingName = ".applying"

// writeApplying writes the marker naming the file being applied, or the
// first of a group, fsynced if sync.
func writeApplying(path, name string, sync bool) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = f.WriteString(name)
	if err == nil && sync {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// rollForward finishes applying the log's last files to a database that
// a crash left behind the log while the log was applying files to it (the
// marker names a file), and reports whether it did; t holds the page
// checksums of the database as it is. It applies them from the first file
// of the group the marker names (a crash in the middle of Apply or
// ApplyFiles); failing that, from the file after the one whose post-apply
// checksum the database has: a replica appends WAL frames without an
// fsync (see ApplyTarget), so a power cut may leave its database several
// groups behind the log, at the end of one of its files. It writes nothing
// unless the files, applied over t, give exactly the last file's
// post-apply checksum. Caller holds l.wmu and l.mu.
func (l *Log) rollForward(ctx context.Context, t *ChecksumTable) (bool, error) {
	marker, err := os.ReadFile(l.path(applyingName))
	if errors.Is(err, os.ErrNotExist) || err == nil && len(marker) == 0 {
		return false, nil // a database behind a log that was not applying is left alone
	} else if err != nil {
		return false, err
	}
	// The marker may name a group before the last (see applySegment), whose
	// first file may since be part of a compacted one.
	if min, _, err := ParseName(string(marker)); err == nil {
		first := slices.IndexFunc(l.files, func(f *logFile) bool { return f.info.Header.MaxTXID >= min })
		if first >= 0 && l.files[first].info.Header.MinTXID <= min {
			if ok, err := l.rollFrom(ctx, t, first); ok || err != nil {
				return ok, err
			}
		}
	}
	for i := len(l.files) - 2; i >= 0; i-- {
		if info := l.files[i].info; info.PostApplyChecksum == t.Checksum() && info.Header.Commit == t.Pages() {
			return l.rollFrom(ctx, t, i+1)
		}
	}
	return false, nil
}

// rollFrom applies the log's files from l.files[first] on to the database
// whose page checksums t holds, if that gives exactly the last file's
// post-apply checksum, and reports whether it did. Caller holds l.wmu and
// l.mu.
func (l *Log) rollFrom(ctx context.Context, t *ChecksumTable, first int) (bool, error) {
	group := l.files[first:]
	last := group[len(group)-1].info
	dry := t.Clone()
	for _, f := range group {
		if _, err := l.applyLogFile(ctx, nil, f, dry, Pos{}, false); err != nil {
			return false, nil
		}
	}
	if dry.Checksum() != last.PostApplyChecksum || dry.Pages() != last.Header.Commit {
		return false, nil
	}
	if _, err := l.applyToDatabase(ctx, group, t, group[0].info.PreApplyPos(), false, nil); err != nil {
		return false, err
	}
	_ = os.Truncate(l.path(applyingName), 0)
	l.Logger.Warn("finished applying the log's last files to the database, which a crash interrupted", "db", l.Name,
		"files", len(group), "from", group[0].info.PreApplyPos(), "to", last.Pos())
	return true, nil
}
