package ltx

// SetFailpoint replaces the failpoint hook, for crash tests.
func SetFailpoint(fn func(name string)) { failpoint = fn }

// SpareTable reports whether the log keeps a spare checksum table for the
// next apply (see scratchTable).
func (l *Log) SpareTable() bool {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	return l.spare != nil
}

// SetCopyTable makes every apply copy the checksum table, as before the
// spare table, for benchmarks to compare; it returns the undo.
func SetCopyTable(on bool) func() {
	old := copyTable
	copyTable = on
	return func() { copyTable = old }
}

// SetMaxRecentBytes sets the bound of the bytes of recent files a log
// keeps in memory; it returns the undo.
func SetMaxRecentBytes(n int) func() {
	old := maxRecentBytes
	maxRecentBytes = n
	return func() { maxRecentBytes = old }
}
